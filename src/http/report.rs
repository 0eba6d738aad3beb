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

/// Why a report was not built: a bad filter (its message, the param it names and, when
/// the query parsed, what was asked), or a failure that stays in the log.
enum Refusal {
    Filter {
        message: String,
        param: Option<String>,
        args: FilterArgs,
    },
    Internal,
}

impl Refusal {
    /// OpenAI's envelope, for `/report.json`.
    fn into_json(self) -> Response {
        match self {
            Refusal::Filter { message, param, .. } => (
                StatusCode::BAD_REQUEST,
                Json(Error::invalid(message, param.as_deref()).envelope()),
            )
                .into_response(),
            Refusal::Internal => internal(),
        }
    }
}

/// The report for the query's filter; axum's own query rejection is plain text, and a
/// typo'd or repeated filter (`?sinse=1h`) must say so rather than report the whole ledger.
async fn build(
    st: &AppState,
    query: Result<Query<FilterArgs>, QueryRejection>,
) -> Result<(Report, FilterArgs), Refusal> {
    let Query(args) = query.map_err(|rejection| {
        let message = rejection.body_text();
        // serde names the field as "unknown field `x`" or "duplicate field `x`".
        let param = message
            .split_once("field `")
            .and_then(|(_, rest)| rest.split_once('`'))
            .map(|(field, _)| field.to_owned());
        Refusal::Filter {
            message,
            param,
            args: FilterArgs::default(),
        }
    })?;
    let filter = match args.filter(report::now_ms()) {
        Ok(f) => f,
        Err((e, param)) => {
            return Err(Refusal::Filter {
                message: e.0,
                param: Some(param.to_owned()),
                args,
            });
        }
    };
    let path = st.ledger.path().to_path_buf();
    let built = tokio::task::spawn_blocking(move || report::build(&[path], &filter)).await;
    match built {
        Ok(Ok(r)) => Ok((r, args)),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "report failed");
            Err(Refusal::Internal)
        }
        Err(e) => {
            tracing::error!(error = %e, "report task failed");
            Err(Refusal::Internal)
        }
    }
}

pub async fn report_json(
    State(st): State<Arc<AppState>>,
    query: Result<Query<FilterArgs>, QueryRejection>,
) -> Response {
    match build(&st, query).await {
        Ok((r, _)) => Json(r).into_response(),
        Err(refusal) => refusal.into_json(),
    }
}

pub async fn report_page(
    State(st): State<Arc<AppState>>,
    query: Result<Query<FilterArgs>, QueryRejection>,
) -> Response {
    match build(&st, query).await {
        Ok((r, args)) => Html(report::html::page(&r, &args)).into_response(),
        Err(Refusal::Filter { message, args, .. }) => (
            StatusCode::BAD_REQUEST,
            Html(report::html::refusal_page(&message, &args)),
        )
            .into_response(),
        Err(Refusal::Internal) => internal(),
    }
}
