//! Requests that are not generation and so are not routed by prefix: passed through to one
//! engine that serves their model, as vLLM serves them.
//!
//! Routes: `POST /tokenize`, `/detokenize`, `/v1/rerank` (and vLLM's `/rerank`, `/v2/rerank`),
//! `/v1/score` (and `/score`), `/v1/messages/count_tokens`, and `GET /v1/models/{id}`.
//!
//! **Which engine.** Among the endpoints serving the request's `model` (its base model, for a
//! LoRA adapter) that take new requests: the healthy ones (answering their scrapes, not
//! penalised after a failure) first, then the least loaded by the router's estimate (waiting +
//! running), ties taken in turn. A request without `model` (vLLM's `/tokenize` and
//! `/detokenize` allow it, meaning the engine's only model) goes to any endpoint that knows its
//! models, by the same order. These calls are cheap next to generation (tokenising, one forward
//! pass for scoring), so they are not booked into the router's load estimate or prefix index,
//! and an endpoint that refuses the connection is skipped for the next (up to
//! `retry.max_attempts`); an engine's answer, errors included, is relayed as it is.
//!
//! **`GET /v1/models/{id}`** is answered from the `/v1/models` list of an engine serving `id`
//! (vLLM has no per-model route), with the card the engine lists, so `id` resolves exactly as
//! in `GET /v1/models`; a model no endpoint serves gets the OpenAI 404.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use kvgate_core::endpoint::EndpointState;
use serde_json::Value;

use kvgate_runtime::openai::ApiError;

use crate::proxy::{
    App, ENDPOINT_RESPONSE_HEADER, count, fetch_models, read_body, relay_plain, send_to,
};

/// What a pass-through request is, for its metrics label and error shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Tokenize,
    Detokenize,
    Rerank,
    Score,
    CountTokens,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Self::Tokenize => "tokenize",
            Self::Detokenize => "detokenize",
            Self::Rerank => "rerank",
            Self::Score => "score",
            Self::CountTokens => "count_tokens",
        }
    }
}

/// The pass-through routes, to merge into the API router.
pub fn routes() -> axum::Router<Arc<App>> {
    use axum::routing::{get, post};
    let route = |kind: Kind| post(move |s, r| pass(s, kind, r));
    axum::Router::new()
        .route("/tokenize", route(Kind::Tokenize))
        .route("/detokenize", route(Kind::Detokenize))
        .route("/rerank", route(Kind::Rerank))
        .route("/v1/rerank", route(Kind::Rerank))
        .route("/v2/rerank", route(Kind::Rerank))
        .route("/score", route(Kind::Score))
        .route("/v1/score", route(Kind::Score))
        .route("/v1/messages/count_tokens", route(Kind::CountTokens))
        // Model ids often hold a `/` (`meta-llama/Llama-3.1-8B-Instruct`): the rest of the path.
        .route("/v1/models/{*id}", get(model_card))
}

async fn pass(State(app): State<Arc<App>>, kind: Kind, req: Request) -> Response {
    let resp = match forward(&app, req).await {
        Ok(r) => r,
        Err(e) if kind == Kind::CountTokens => (
            e.status,
            axum::Json(kvgate_runtime::anthropic::error_body(&e)),
        )
            .into_response(),
        Err(e) => e.into_response(),
    };
    count(&app.metrics, kind.label(), resp.status());
    resp
}

/// `model` of a JSON object body, if it names one.
fn model_of(body: &[u8]) -> Result<Option<String>, ApiError> {
    kvgate_runtime::openai::check_json_values(body)?;
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))?;
    let Value::Object(obj) = v else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "request body must be a JSON object",
        ));
    };
    match obj.get("model") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(m)) if !m.is_empty() => Ok(Some(m.clone())),
        Some(_) => Err(ApiError::bad_param(
            "model",
            "`model` must be a non-empty string",
        )),
    }
}

/// Endpoints that can answer for `model` (any model when `None`), best first (module docs).
fn candidates(app: &App, model: Option<&str>) -> Result<Vec<String>, ApiError> {
    let base = match model {
        Some(m) => Some(
            app.control
                .resolve_model(m)
                .ok_or_else(|| app.control.unknown_model(m))?
                .0,
        ),
        None => None,
    };
    let now = app.control.now_us();
    let mut ranked: Vec<(bool, u64, String)> = app.control.with_router(|r| {
        r.endpoints()
            .filter(|e| e.state == EndpointState::Ready)
            .filter(|e| match &base {
                Some(b) => e.spec.models.iter().any(|m| m == b),
                None => !e.spec.models.is_empty(),
            })
            .map(|e| {
                let unhealthy = e.scrape_failures > 0 || e.penalised_until_us > now;
                let load = u64::from(e.estimate.waiting) + u64::from(e.estimate.running);
                (unhealthy, load, e.address.to_owned())
            })
            .collect()
    });
    if ranked.is_empty() {
        return Err(match model {
            Some(m) => app.control.unknown_model(m),
            None => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no ready endpoint"),
        });
    }
    // Equal keys are taken in turn: rotate before the stable sort.
    let turn = app.passthrough_turn.fetch_add(1, Ordering::Relaxed) % ranked.len();
    ranked.rotate_left(turn);
    ranked.sort_by_key(|(unhealthy, load, _)| (*unhealthy, *load));
    Ok(ranked.into_iter().map(|(_, _, a)| a).collect())
}

async fn forward(app: &Arc<App>, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let body = read_body(body, &parts.headers, &app.limits).await?;
    let model = model_of(&body)?;
    let path = parts
        .uri
        .path_and_query()
        .map_or(parts.uri.path(), |p| p.as_str());
    let mut tried = 0;
    for address in candidates(app, model.as_deref())?
        .iter()
        .take(app.max_attempts.max(1) as usize)
    {
        tried += 1;
        match send_to(
            app,
            address,
            Method::POST,
            path,
            &parts.headers,
            body.clone(),
        )
        .await
        {
            Ok(resp) => return Ok(relay_plain(resp, address)),
            Err(_) => {
                tracing::debug!(endpoint = %address, path, "pass-through request failed to connect; trying the next endpoint");
            }
        }
    }
    Err(ApiError::new(
        StatusCode::BAD_GATEWAY,
        format!("no endpoint could be reached after {tried} attempt(s)"),
    ))
}

async fn model_card(
    State(app): State<Arc<App>>,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Response {
    // A path that is no model id (not UTF-8 once percent-decoded) is refused in the OpenAI
    // shape and counted, like every other answer, rather than by axum's plain-text rejection.
    let resp = match id {
        Ok(Path(id)) => match card(&app, &id).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        },
        Err(rejection) => ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid model id in the path: {}", rejection.body_text()),
        )
        .into_response(),
    };
    count(&app.metrics, "model", resp.status());
    resp
}

async fn card(app: &App, id: &str) -> Result<Response, ApiError> {
    let mut answered = false;
    for address in candidates(app, Some(id))?
        .iter()
        .take(app.max_attempts.max(1) as usize)
    {
        let Some(list) = fetch_models(app, address).await else {
            continue;
        };
        answered = true;
        let Some(card) = list
            .into_iter()
            .find(|c| c.get("id").and_then(Value::as_str) == Some(id))
        else {
            continue;
        };
        let mut resp = axum::Json(card).into_response();
        if let Ok(v) = HeaderValue::from_str(address) {
            resp.headers_mut()
                .insert(HeaderName::from_static(ENDPOINT_RESPONSE_HEADER), v);
        }
        return Ok(resp);
    }
    if !answered {
        // Engines serve it (by their last lists) but none answered now: unavailable, not absent.
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no endpoint serving the model `{id}` answered /v1/models"),
        ));
    }
    Err(ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!("The model `{id}` does not exist."),
        param: Some("model"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_is_optional_but_must_be_a_string() {
        assert_eq!(model_of(br#"{"prompt":"x"}"#).unwrap(), None);
        assert_eq!(
            model_of(br#"{"model":"m","prompt":"x"}"#)
                .unwrap()
                .as_deref(),
            Some("m")
        );
        assert_eq!(
            model_of(br#"{"model":3}"#).unwrap_err().param,
            Some("model")
        );
        assert_eq!(
            model_of(b"[1]").unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }
}
