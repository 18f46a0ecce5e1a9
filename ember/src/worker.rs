//! The messages between the page and the engine's Web Worker, typed once for both sides.
//!
//! Each travels as a JSON string (`postMessage` of text), tagged by `type`. The page sends
//! [`ToWorker`]; the worker (and the loader shim `scripts/build-app.sh` writes, which sends
//! `build` before the wasm starts) answer with [`FromWorker`].

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Page → worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToWorker {
    /// Fetch the model, SAE and atlas from beside the page (`base`: the page's URL) and build
    /// the engine on `backend` (`"cpu"` or `"webgpu"`).
    Load { backend: String, base: String },
    /// One API request, answered exactly as the server would answer it: `path` is under
    /// [`crate::routes::API_PREFIX`], with any query string.
    Call {
        id: u64,
        method: String,
        path: String,
        #[serde(default)]
        body: Value,
    },
    /// Stop the streamed reply of call `id`.
    Cancel { id: u64 },
}

/// Worker → page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromWorker {
    /// The worker's wasm is running and listening (a message posted before is lost).
    Started,
    /// The build the worker's loader belongs to (from the loader shim).
    Build {
        build: String,
    },
    /// Loading progress: bytes of `file` so far (`total` 0 when unknown).
    Progress {
        file: String,
        loaded: f64,
        total: f64,
        #[serde(default)]
        cached: bool,
    },
    /// The model is loaded: chat works. The SAE and the atlas follow ([`FromWorker::FeaturesReady`]);
    /// a request that needs them meanwhile waits for them.
    Ready {
        backend: String,
        model: String,
        cached: bool,
        seconds: f64,
    },
    /// The SAE and the atlas are attached too (`seconds` since the load began): every route works.
    FeaturesReady {
        seconds: f64,
    },
    /// The SAE or the atlas could not be loaded: chat goes on without steering, and requests
    /// that need them fail with `message`.
    FeaturesFailed {
        message: String,
    },
    LoadError {
        message: String,
    },
    /// A step of call `id`'s long work as it starts (AutoSteer's): `step` of `of`.
    Step {
        id: u64,
        step: usize,
        of: usize,
        what: String,
    },
    /// One chunk of call `id`'s streamed reply.
    Chunk {
        id: u64,
        chunk: Value,
    },
    /// Call `id`'s answer, or (for a stream) its end.
    Result {
        id: u64,
        #[serde(flatten)]
        outcome: Outcome,
    },
}

/// How a call ended: its value, or the HTTP status and message the server would send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Outcome {
    Ok { ok: Accepted, value: Value },
    Err { ok: Refused, status: u16, message: String },
}

/// `"ok": true`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Accepted;
/// `"ok": false`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Refused;

macro_rules! bool_tag {
    ($tag:ty, $value:literal) => {
        impl Serialize for $tag {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_bool($value)
            }
        }
        impl<'de> Deserialize<'de> for $tag {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                match bool::deserialize(deserializer)? {
                    $value => Ok(Self),
                    _ => Err(serde::de::Error::custom(concat!("expected ", stringify!($value)))),
                }
            }
        }
    };
}
bool_tag!(Accepted, true);
bool_tag!(Refused, false);

impl Outcome {
    pub fn from_result(result: Result<Value, crate::EmberError>) -> Self {
        match result {
            Ok(value) => Outcome::Ok { ok: Accepted, value },
            Err(e) => Outcome::Err {
                ok: Refused,
                status: e.status(),
                message: e.to_string(),
            },
        }
    }

    /// The value, or the status and message.
    pub fn into_result(self) -> Result<Value, (u16, String)> {
        match self {
            Outcome::Ok { value, .. } => Ok(value),
            Outcome::Err { status, message, .. } => Err((status, message)),
        }
    }
}

impl ToWorker {
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("worker messages always serialize")
    }

    pub fn from_text(text: &str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }
}

impl FromWorker {
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("worker messages always serialize")
    }

    pub fn from_text(text: &str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn messages_round_trip_in_the_shape_both_sides_and_the_loader_shim_write() {
        let call = ToWorker::Call {
            id: 7,
            method: "POST".into(),
            path: "/features/lookup".into(),
            body: json!({ "indices": [1] }),
        };
        let text = call.to_text();
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["type"], "call");
        assert_eq!(ToWorker::from_text(&text), Some(call));
        // What scripts/build-app.sh's loader shim posts.
        assert_eq!(
            FromWorker::from_text(r#"{"type": "build", "build": "abc"}"#),
            Some(FromWorker::Build { build: "abc".into() })
        );
        for message in [
            FromWorker::Result {
                id: 3,
                outcome: Outcome::from_result(Ok(json!({ "x": 1 }))),
            },
            FromWorker::Result {
                id: 4,
                outcome: Outcome::from_result(Err(crate::EmberError::Invalid("no".into()))),
            },
            FromWorker::Progress {
                file: "model".into(),
                loaded: 1.0,
                total: 2.0,
                cached: false,
            },
            FromWorker::FeaturesReady { seconds: 1.5 },
            FromWorker::FeaturesFailed { message: "damaged".into() },
        ] {
            assert_eq!(FromWorker::from_text(&message.to_text()), Some(message));
        }
        let refused = serde_json::from_str::<Value>(
            &FromWorker::Result {
                id: 4,
                outcome: Outcome::from_result(Err(crate::EmberError::Invalid("no".into()))),
            }
            .to_text(),
        )
        .unwrap();
        assert_eq!(
            refused,
            json!({ "type": "result", "id": 4, "ok": false, "status": 422, "message": "no" })
        );
        assert_eq!(ToWorker::from_text("{\"type\": \"explode\"}"), None);
    }
}
