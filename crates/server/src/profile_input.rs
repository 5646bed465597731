//! From posted text to what the store keeps: the parsed profile, its
//! canonical JSON (whose digest decides whether anything changed) and the
//! facts the store indexes.

use keelson_core::profile::{Profile, ValidationErrors};
use keelson_store::ApplyProfile;

use crate::access::Proposed;

/// A profile that parsed and validated.
#[derive(Debug, Clone)]
pub struct ParsedProfile {
    /// The profile.
    pub profile: Profile,
    /// `serde_json` of the profile: formatting and comments of the text do not show.
    pub canonical_json: String,
}

/// Parses and validates a profile (YAML or JSON).
pub fn parse(text: &str) -> Result<ParsedProfile, ValidationErrors> {
    let profile = keelson_core::profile::parse(text)?;
    let canonical_json = serde_json::to_string(&profile).map_err(|e| ValidationErrors {
        errors: vec![keelson_core::profile::FieldError {
            path: String::new(),
            message: format!("the profile cannot be stored: {e}"),
            line: 0,
            column: 0,
        }],
    })?;
    Ok(ParsedProfile {
        profile,
        canonical_json,
    })
}

impl ParsedProfile {
    /// The facts access control judges.
    pub fn proposed(&self) -> Proposed<'_> {
        Proposed {
            team: &self.profile.spec.team,
            owners: &self.profile.spec.owners,
        }
    }

    /// What the store needs to make this profile the app's next revision.
    pub fn to_apply(
        &self,
        text: &str,
        author: &str,
        message: Option<String>,
        rolled_back_to: Option<i64>,
    ) -> ApplyProfile {
        ApplyProfile {
            name: self.profile.metadata.name.clone(),
            team: self.profile.spec.team.clone(),
            owners: self.profile.spec.owners.clone(),
            labels: self.profile.metadata.labels.clone(),
            description: self.profile.spec.description.clone(),
            text: text.to_string(),
            canonical_json: self.canonical_json.clone(),
            author: author.to_string(),
            message,
            rolled_back_to,
        }
    }
}
