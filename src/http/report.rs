//! `GET /report` (HTML page) and `GET /report.json`: the report over this gateway's own
//! ledger, built by the same code as `tiergate report`, on a blocking thread so the
//! SQLite reads never stall the async workers.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};

use crate::AppState;
use crate::error::Error;
use crate::report::{self, FilterArgs, Report};

async fn build(st: &AppState, args: &FilterArgs) -> Result<Report, Response> {
    let bad = |message: String| {
        let e = Error::InvalidRequest {
            message,
            param: None,
            code: "invalid_request",
        };
        (StatusCode::BAD_REQUEST, Json(e.envelope())).into_response()
    };
    let filter = args.filter(report::now_ms()).map_err(|e| bad(e.0))?;
    let path = st.ledger.path().to_path_buf();
    let built = tokio::task::spawn_blocking(move || report::build(&[path], &filter)).await;
    match built {
        Ok(Ok(r)) => Ok(r),
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

/// The file path and SQLite's message stay in the log: they are the operator's business.
fn internal() -> Response {
    let e = Error::Internal("the report could not be built; see the gateway's log".into());
    (StatusCode::INTERNAL_SERVER_ERROR, Json(e.envelope())).into_response()
}

pub async fn report_json(State(st): State<Arc<AppState>>, Query(args): Query<FilterArgs>) -> Response {
    match build(&st, &args).await {
        Ok(r) => Json(r).into_response(),
        Err(resp) => resp,
    }
}

pub async fn report_page(State(st): State<Arc<AppState>>, Query(args): Query<FilterArgs>) -> Response {
    match build(&st, &args).await {
        Ok(r) => Html(report::html::page(&r, &args)).into_response(),
        Err(resp) => resp,
    }
}
