//! The one HTTP error boundary: every failure becomes a status and a JSON body
//! `{ "error": { "code", "message", "field", "details" } }`. Internal causes
//! are logged here and never sent.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use keelson_core::profile::{FieldError, ValidationErrors};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One field problem in a rejected profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FieldProblem {
    /// Dotted field path, e.g. `spec.environments.prod.replicas`.
    pub path: String,
    /// What is wrong and what would be valid.
    pub message: String,
    /// 1-based line in the posted text (0 when unknown).
    pub line: usize,
    /// 1-based column (0 when unknown).
    pub column: usize,
}

impl From<&FieldError> for FieldProblem {
    fn from(e: &FieldError) -> FieldProblem {
        FieldProblem {
            path: e.path.clone(),
            message: e.message.clone(),
            line: e.line,
            column: e.column,
        }
    }
}

/// The `error` object of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `invalid_profile`, `forbidden`.
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
    /// The field or parameter at fault, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Every field problem, for a rejected profile.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<FieldProblem>,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// An error on its way to becoming an HTTP response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    detail: ErrorDetail,
}

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            detail: ErrorDetail {
                code: code.into(),
                message: message.into(),
                field: None,
                details: Vec::new(),
            },
        }
    }

    /// Names the field or parameter at fault.
    pub fn with_field(mut self, field: impl Into<String>) -> ApiError {
        self.detail.field = Some(field.into());
        self
    }

    /// 400: the request cannot be read.
    pub fn bad_request(code: &str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 401: no valid token.
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 403: the token may not do this.
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 422: well-formed but invalid.
    pub fn unprocessable(code: &str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    /// 422 for a profile that does not validate, with every field problem.
    pub fn invalid_profile(errors: &ValidationErrors) -> ApiError {
        let details: Vec<FieldProblem> = errors.errors.iter().map(FieldProblem::from).collect();
        let message = match details.as_slice() {
            [one] if one.path.is_empty() => one.message.clone(),
            [one] => format!("{}: {}", one.path, one.message),
            many => format!("the profile has {} errors", many.len()),
        };
        let mut e = ApiError::unprocessable("invalid_profile", message);
        e.detail.field = details
            .first()
            .map(|d| d.path.clone())
            .filter(|p| !p.is_empty());
        e.detail.details = details;
        e
    }

    /// 500: logs `cause` and tells the client nothing more.
    pub fn internal(cause: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %cause, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server log",
        )
    }

    /// The status this error answers with.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The JSON detail.
    pub fn detail(&self) -> &ErrorDetail {
        &self.detail
    }
}

impl From<keelson_store::Error> for ApiError {
    fn from(e: keelson_store::Error) -> ApiError {
        use keelson_store::Error as E;
        match e {
            E::NotFound { kind, name } => ApiError::not_found(format!("{kind} {name:?} not found")),
            E::Conflict(message) => ApiError::new(StatusCode::CONFLICT, "conflict", message),
            E::Denied(message) => ApiError::forbidden(message),
            E::Invalid(message) => ApiError::unprocessable("invalid", message),
            E::Connect(_) => {
                tracing::error!(error = %e, "database unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the database is unavailable",
                )
            }
            other => ApiError::internal(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status;
        let mut response = (status, axum::Json(ErrorBody { error: self.detail })).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"keelson\""),
            );
        }
        response
    }
}
