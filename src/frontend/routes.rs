//! HTTP handlers and the middleware around them (API key, status counting, body limit).

use super::error::ApiError;
use super::generate::{respond_whole, start_all, Api};
use super::openai::{unix_now, ModelCard, ModelList};
use super::sse::respond_stream;
use super::validate::{validate_chat, validate_completion, ValidRequest};
use super::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::Instant;

pub fn app(state: Arc<AppState>) -> axum::Router {
    let api = axum::Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .layer(middleware::from_fn_with_state(state.clone(), count_status))
        .layer(middleware::from_fn_with_state(state.clone(), check_api_key))
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes));
    axum::Router::new()
        .merge(api)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .with_state(state)
}

fn parse<T: DeserializeOwned>(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::BodyTooLarge(state.config.max_body_bytes),
        _ => ApiError::BadRequest(format!(
            "could not read the request body: {}",
            e.body_text()
        )),
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::BadRequest(format!("invalid request body: {e}")))
}

async fn chat(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let start = Instant::now();
    let valid = validate_chat(
        parse(&state, body)?,
        state.tokenizer.as_deref(),
        &state.config.limits,
    )?;
    run(state, valid, Api::Chat, start).await
}

async fn completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let start = Instant::now();
    let valid = validate_completion(
        parse(&state, body)?,
        state.tokenizer.as_deref(),
        &state.config.limits,
    )?;
    run(state, valid, Api::Completion, start).await
}

async fn run(
    state: Arc<AppState>,
    valid: ValidRequest,
    api: Api,
    start: Instant,
) -> Result<Response, ApiError> {
    let deadline = tokio::time::Instant::from_std(start) + state.config.request_timeout;
    let streams = start_all(&state, &valid, deadline).await?;
    if valid.stream {
        Ok(respond_stream(state, valid, api, streams, start, deadline))
    } else {
        Ok(
            Json(respond_whole(&state, valid, api, streams, start, deadline).await?)
                .into_response(),
        )
    }
}

async fn models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    let limits = &state.config.limits;
    Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: limits.served_model_name.clone(),
            object: "model",
            created: unix_now(),
            owned_by: "tandem",
            max_model_len: limits.max_model_len,
        }],
    })
}

/// 200 while at least one worker takes requests.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    let loads = state.router.loads();
    let up = loads.iter().filter(|w| w.available).count();
    let status = if up > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(serde_json::json!({"status": if up > 0 {"ok"} else {"unavailable"}, "workers": loads.len(), "available": up})))
        .into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let text = state.metrics.render(&state.router.loads());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn check_api_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if given.and_then(|v| v.strip_prefix("Bearer ")) != Some(key.as_str()) {
            let e = ApiError::Unauthorized(
                "missing or wrong API key (send `Authorization: Bearer <key>`)".into(),
            );
            state.metrics.record_status(e.status().as_u16());
            return e.into_response();
        }
    }
    next.run(req).await
}

/// Counts every answered request by status; streams count themselves when they end.
async fn count_status(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let is_stream = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if !is_stream {
        state.metrics.record_status(resp.status().as_u16());
    }
    resp
}
