//! `GET /report` (HTML page) and `GET /report.json`: the report over this gateway's own
//! ledger, built by the same code as `tiergate report`, on a blocking thread so the
//! SQLite reads never stall the async workers.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};

use crate::AppState;
use crate::error::Error;
use crate::report::{self, FilterArgs, Report};

/// The file path and SQLite's message stay in the log: they are the operator's business.
fn internal() -> Response {
    let e = Error::Internal("the report could not be built; see the gateway's log".into());
    (StatusCode::INTERNAL_SERVER_ERROR, Json(e.envelope())).into_response()
}

/// The report for the query's filter; axum's own query rejection is plain text, and a
/// typo'd or repeated filter (`?sinse=1h`) must say so in OpenAI's envelope rather than
/// report the whole ledger.
async fn build(
    st: &AppState,
    query: Result<Query<FilterArgs>, QueryRejection>,
) -> Result<(Report, FilterArgs), Response> {
    let bad = |message: String, param: Option<&str>| {
        (StatusCode::BAD_REQUEST, Json(Error::invalid(message, param).envelope())).into_response()
    };
    let Query(args) = query.map_err(|rejection| {
        let message = rejection.body_text();
        // serde names the field as "unknown field `x`" or "duplicate field `x`".
        let param = message
            .split_once("field `")
            .and_then(|(_, rest)| rest.split_once('`'))
            .map(|(field, _)| field);
        bad(message.clone(), param)
    })?;
    let filter = args
        .filter(report::now_ms())
        .map_err(|(e, param)| bad(e.0, Some(param)))?;
    let path = st.ledger.path().to_path_buf();
    let built = tokio::task::spawn_blocking(move || report::build(&[path], &filter)).await;
    match built {
        Ok(Ok(r)) => Ok((r, args)),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "report failed");
            Err(internal())
        }
        Err(e) => {
            tracing::error!(error = %e, "report task failed");
            Err(internal())
        }
    }
}

pub async fn report_json(
    State(st): State<Arc<AppState>>,
    query: Result<Query<FilterArgs>, QueryRejection>,
) -> Response {
    match build(&st, query).await {
        Ok((r, _)) => Json(r).into_response(),
        Err(resp) => resp,
    }
}

pub async fn report_page(
    State(st): State<Arc<AppState>>,
    query: Result<Query<FilterArgs>, QueryRejection>,
) -> Response {
    match build(&st, query).await {
        Ok((r, args)) => Html(report::html::page(&r, &args)).into_response(),
        Err(resp) => resp,
    }
}
