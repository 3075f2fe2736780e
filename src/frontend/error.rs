//! The one place where failures become HTTP status codes and OpenAI error bodies
//! (`{"error": {"message", "type", "code"}}`).

use crate::engine::types::EngineError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

/// A failure of one API call, before or during generation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON, a field of the wrong type or out of range, an unsupported option.
    #[error("{0}")]
    BadRequest(String),
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("request body is larger than the limit of {0} bytes")]
    BodyTooLarge(usize),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::ModelNotFound(_) | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Engine(e) => match e {
                EngineError::InvalidRequest(_)
                | EngineError::PromptTooLong { .. }
                | EngineError::NeverFits { .. } => StatusCode::BAD_REQUEST,
                EngineError::QueueFull(_) => StatusCode::TOO_MANY_REQUESTS,
                EngineError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                EngineError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
                EngineError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            },
        }
    }

    /// OpenAI's `type` and `code` fields.
    fn kind_and_code(&self) -> (&'static str, Option<&'static str>) {
        match self {
            ApiError::BadRequest(_) | ApiError::BodyTooLarge(_) => ("invalid_request_error", None),
            ApiError::ModelNotFound(_) => ("invalid_request_error", Some("model_not_found")),
            ApiError::NotFound(_) => ("invalid_request_error", Some("not_found")),
            ApiError::Unauthorized(_) => ("invalid_request_error", Some("invalid_api_key")),
            ApiError::Engine(e) => match e {
                EngineError::InvalidRequest(_) => ("invalid_request_error", None),
                EngineError::PromptTooLong { .. } | EngineError::NeverFits { .. } => {
                    ("invalid_request_error", Some("context_length_exceeded"))
                }
                EngineError::QueueFull(_) => ("rate_limit_error", Some("rate_limit_exceeded")),
                EngineError::Unavailable(_) => ("server_error", Some("service_unavailable")),
                EngineError::Internal(_) => ("server_error", Some("internal_error")),
                EngineError::Timeout(_) => ("server_error", Some("timeout")),
            },
        }
    }

    pub fn body(&self) -> ErrorBody {
        let (kind, code) = self.kind_and_code();
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind,
                code,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status(), Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_map_to_their_status() {
        let cases = [
            (EngineError::QueueFull(3), 429),
            (EngineError::Internal("boom".into()), 500),
            (EngineError::Unavailable("w0".into()), 503),
            (EngineError::Timeout("slow".into()), 504),
            (EngineError::InvalidRequest("bad".into()), 400),
            (
                EngineError::PromptTooLong {
                    prompt_tokens: 9,
                    max_tokens: 2,
                    max_model_len: 10,
                },
                400,
            ),
            (
                EngineError::NeverFits {
                    needed: 9,
                    total: 2,
                },
                400,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(ApiError::from(e).status().as_u16(), code);
        }
        assert_eq!(ApiError::ModelNotFound("x".into()).status().as_u16(), 404);
        assert_eq!(ApiError::Unauthorized("no".into()).status().as_u16(), 401);
    }

    #[test]
    fn body_has_openai_shape() {
        let body = serde_json::to_value(ApiError::ModelNotFound("gpt-9".into()).body()).unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "model_not_found");
        assert!(body["error"]["message"].as_str().unwrap().contains("gpt-9"));
    }
}
