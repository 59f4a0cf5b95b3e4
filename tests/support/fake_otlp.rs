//! In-process OTLP/HTTP trace receiver (a collector's `POST /v1/traces`, protobuf) on
//! 127.0.0.1:0. It keeps every body as received (for byte scans) and decoded (for the
//! span tree), and answers with an empty `ExportTraceServiceResponse`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

#[derive(Default)]
struct Received {
    raw: Vec<Vec<u8>>,
    decoded: Vec<ExportTraceServiceRequest>,
    /// Bodies that were not an `ExportTraceServiceRequest`.
    undecodable: usize,
}

pub struct FakeOtlp {
    /// The base URL a collector would be configured with (`http://127.0.0.1:PORT`).
    pub endpoint: String,
    received: Arc<Mutex<Received>>,
    task: tokio::task::JoinHandle<()>,
}

/// One received span with the resource attributes it was exported under.
#[derive(Clone, Debug)]
pub struct Received1 {
    pub resource: HashMap<String, AnyValue>,
    pub span: Span,
}

impl Received1 {
    pub fn attr(&self, key: &str) -> Option<&AnyValue> {
        attr(&self.span.attributes, key)
    }
}

pub fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a AnyValue> {
    attrs.iter().find(|kv| kv.key == key)?.value.as_ref()
}

/// A string attribute's value.
pub fn as_str(v: Option<&AnyValue>) -> Option<&str> {
    match v?.value.as_ref()? {
        Value::StringValue(s) => Some(s),
        _ => None,
    }
}

/// An integer attribute's value.
pub fn as_int(v: Option<&AnyValue>) -> Option<i64> {
    match v?.value.as_ref()? {
        Value::IntValue(n) => Some(*n),
        _ => None,
    }
}

async fn traces(State(received): State<Arc<Mutex<Received>>>, body: Bytes) -> impl IntoResponse {
    let decoded = ExportTraceServiceRequest::decode(body.as_ref());
    let mut r = received.lock().unwrap_or_else(|p| p.into_inner());
    r.raw.push(body.to_vec());
    match decoded {
        Ok(req) => r.decoded.push(req),
        Err(_) => r.undecodable += 1,
    }
    let answer = ExportTraceServiceResponse::default().encode_to_vec();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        answer,
    )
}

impl FakeOtlp {
    pub async fn start() -> FakeOtlp {
        let received = Arc::new(Mutex::new(Received::default()));
        let app = Router::new()
            .route("/v1/traces", post(traces))
            .with_state(received.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the OTLP receiver");
        let addr = listener.local_addr().expect("local addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeOtlp {
            endpoint: format!("http://{addr}"),
            received,
            task,
        }
    }

    fn st(&self) -> std::sync::MutexGuard<'_, Received> {
        self.received.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many export requests arrived (decodable or not).
    pub fn posts(&self) -> usize {
        self.st().raw.len()
    }

    pub fn undecodable(&self) -> usize {
        self.st().undecodable
    }

    /// Every body as received.
    pub fn raw(&self) -> Vec<Vec<u8>> {
        self.st().raw.clone()
    }

    pub fn requests(&self) -> Vec<ExportTraceServiceRequest> {
        self.st().decoded.clone()
    }

    /// Every span received, each with its resource's attributes.
    pub fn spans(&self) -> Vec<Received1> {
        let mut out = Vec::new();
        for req in self.requests() {
            for rs in req.resource_spans {
                let resource: HashMap<String, AnyValue> = rs
                    .resource
                    .map(|r| r.attributes)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|kv| Some((kv.key, kv.value?)))
                    .collect();
                for ss in rs.scope_spans {
                    for span in ss.spans {
                        out.push(Received1 {
                            resource: resource.clone(),
                            span,
                        });
                    }
                }
            }
        }
        out
    }
}

impl Drop for FakeOtlp {
    fn drop(&mut self) {
        self.task.abort();
    }
}
