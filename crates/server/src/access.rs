//! Who may change what. Pure decisions over a caller and the stored app;
//! the store runs them inside the write transaction.
//!
//! | role   | reads | apps                                                        | team change | environments, targets, tokens |
//! |--------|-------|-------------------------------------------------------------|-------------|-------------------------------|
//! | viewer | yes   | no                                                          | no          | no                            |
//! | member | yes   | if an owner of the stored app or in its stored team; a new app must name them or one of their teams | no | no |
//! | admin  | yes   | yes                                                         | yes         | yes                           |

use keelson_store::{AppHead, Role, TokenRecord};

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's public id.
    pub token_id: String,
    /// The person or service, recorded as the author of changes.
    pub subject: String,
    /// The teams whose apps a member may change.
    pub teams: Vec<String>,
    /// What the token may do.
    pub role: Role,
}

impl From<TokenRecord> for Caller {
    fn from(t: TokenRecord) -> Caller {
        Caller {
            token_id: t.id,
            subject: t.token.subject,
            teams: t.token.teams,
            role: t.token.role,
        }
    }
}

impl Caller {
    /// Refuses viewers before any work is done.
    pub fn require_writer(&self) -> Result<(), String> {
        match self.role {
            Role::Viewer => Err(format!(
                "{} holds a viewer token, which cannot change anything",
                self.subject
            )),
            Role::Member | Role::Admin => Ok(()),
        }
    }

    /// Only admins manage environments, targets and tokens.
    pub fn require_admin(&self) -> Result<(), String> {
        match self.role {
            Role::Admin => Ok(()),
            _ => Err(format!(
                "only admins may do this; {} holds a {} token",
                self.subject,
                self.role.as_str()
            )),
        }
    }

    fn may_change_stored(&self, stored: &AppHead) -> bool {
        stored.owners.contains(&self.subject) || self.teams.contains(&stored.team)
    }
}

/// The facts of a posted (or restored) profile that access depends on.
#[derive(Debug, Clone, Copy)]
pub struct Proposed<'a> {
    /// Its `spec.team`.
    pub team: &'a str,
    /// Its `spec.owners`.
    pub owners: &'a [String],
}

/// May `caller` store `proposed` over `stored` (None: the app is new)?
/// Judged on the stored revision, never on the posted one, except that a new
/// app must name the caller or one of their teams.
pub fn may_apply(
    caller: &Caller,
    proposed: Proposed<'_>,
    stored: Option<&AppHead>,
) -> Result<(), String> {
    caller.require_writer()?;
    if caller.role == Role::Admin {
        return Ok(());
    }
    match stored {
        None => {
            if proposed.owners.contains(&caller.subject)
                || caller.teams.iter().any(|t| t == proposed.team)
            {
                Ok(())
            } else {
                Err(format!(
                    "a new app must name you ({}) in spec.owners or one of your teams ({}) in spec.team",
                    caller.subject,
                    list(&caller.teams)
                ))
            }
        }
        Some(stored) => {
            if !caller.may_change_stored(stored) {
                return Err(not_yours(caller, stored));
            }
            if proposed.team != stored.team {
                return Err(format!(
                    "only admins change an app's team ({:?} -> {:?})",
                    stored.team, proposed.team
                ));
            }
            Ok(())
        }
    }
}

/// May `caller` delete (or otherwise change without a new profile) `stored`?
pub fn may_change(caller: &Caller, stored: &AppHead) -> Result<(), String> {
    caller.require_writer()?;
    if caller.role == Role::Admin || caller.may_change_stored(stored) {
        Ok(())
    } else {
        Err(not_yours(caller, stored))
    }
}

fn not_yours(caller: &Caller, stored: &AppHead) -> String {
    format!(
        "app {:?} belongs to team {:?} and owners [{}]; {} is neither an owner nor in that team",
        stored.name,
        stored.team,
        stored.owners.join(", "),
        caller.subject
    )
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(role: Role, subject: &str, teams: &[&str]) -> Caller {
        Caller {
            token_id: "tok".into(),
            subject: subject.into(),
            teams: teams.iter().map(|t| t.to_string()).collect(),
            role,
        }
    }

    fn stored(team: &str, owners: &[&str]) -> AppHead {
        AppHead {
            name: "web".into(),
            team: team.into(),
            owners: owners.iter().map(|o| o.to_string()).collect(),
            current_revision: 3,
            digest: "sha256:x".into(),
            deleted: false,
        }
    }

    fn posted<'a>(team: &'a str, owners: &'a [String]) -> Proposed<'a> {
        Proposed { team, owners }
    }

    #[test]
    fn viewers_change_nothing() {
        let v = caller(Role::Viewer, "vic", &["shop"]);
        let owners = vec!["vic".to_string()];
        assert!(may_apply(&v, posted("shop", &owners), None).is_err());
        assert!(may_change(&v, &stored("shop", &["vic"])).is_err());
    }

    #[test]
    fn members_change_apps_they_own_or_their_team_owns() {
        let m = caller(Role::Member, "ann", &["shop"]);
        let none: Vec<String> = vec![];
        assert!(may_apply(&m, posted("shop", &none), Some(&stored("shop", &[]))).is_ok());
        assert!(may_apply(&m, posted("pay", &none), Some(&stored("pay", &["ann"]))).is_ok());
        let err = may_apply(&m, posted("pay", &none), Some(&stored("pay", &["bob"]))).unwrap_err();
        assert!(err.contains("neither an owner nor in that team"), "{err}");
        assert!(may_change(&m, &stored("pay", &["bob"])).is_err());
    }

    #[test]
    fn the_stored_app_decides_not_the_posted_one() {
        // Naming yourself in the posted profile does not take over someone else's app.
        let m = caller(Role::Member, "ann", &["shop"]);
        let owners = vec!["ann".to_string()];
        assert!(may_apply(&m, posted("pay", &owners), Some(&stored("pay", &["bob"]))).is_err());
    }

    #[test]
    fn only_admins_change_the_team() {
        let m = caller(Role::Member, "ann", &["shop", "pay"]);
        let none: Vec<String> = vec![];
        let err = may_apply(&m, posted("pay", &none), Some(&stored("shop", &["ann"]))).unwrap_err();
        assert!(err.contains("only admins change an app's team"), "{err}");
        let a = caller(Role::Admin, "root", &[]);
        assert!(may_apply(&a, posted("pay", &none), Some(&stored("shop", &[]))).is_ok());
    }

    #[test]
    fn a_new_app_must_name_the_caller_or_their_team() {
        let m = caller(Role::Member, "ann", &["shop"]);
        let ann = vec!["ann".to_string()];
        let bob = vec!["bob".to_string()];
        assert!(may_apply(&m, posted("shop", &bob), None).is_ok());
        assert!(may_apply(&m, posted("pay", &ann), None).is_ok());
        assert!(may_apply(&m, posted("pay", &bob), None).is_err());
    }

    #[test]
    fn admin_only_operations() {
        assert!(caller(Role::Admin, "root", &[]).require_admin().is_ok());
        assert!(caller(Role::Member, "ann", &[]).require_admin().is_err());
    }
}
