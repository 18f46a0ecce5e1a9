//! The route table: every operation of the API once, as data. The axum router
//! (`kindling-server`) and the browser worker are both built from [`Route::ALL`]; a request
//! is parsed once ([`Request::parse`]) and answered through one [`dispatch`] over a
//! [`Provider`]. Adding a route is one variant here, its parse, and its provider method.

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::EmberError;
use crate::replies::{
    AutoConditional, AutoEdits, ChatCompletion, Contrast, ContrastiveDatasets, Dashboard, FeatureMap, Features, LogitAttribution, Lookup,
    Models, Neighbors, TokenFeatures, Tokens,
};
use crate::wire::{
    AttributionRequest, ChatRequest, ComputeFeaturesRequest, ContrastRequest, ContrastiveDatasetRequest, DashboardRequest, LogitsRequest,
    LogitsResponse, LookupRequest, NeighborsRequest, RerankRequest, SpecificationRequest, TokenizeRequest,
};

/// Where the Goodfire API lives on a server; the worker takes paths relative to it.
pub const API_PREFIX: &str = "/api/inference/v1";
/// Where the OpenAI-style aliases live ([`Route::openai_alias`]).
pub const OPENAI_PREFIX: &str = "/v1";

/// An HTTP method the API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
        }
    }
}

/// One operation of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    ChatCompletions,
    ComputeLogits,
    ComputeFeatures,
    Contrast,
    Search,
    Rerank,
    List,
    Lookup,
    Dashboard,
    AutoEdits,
    AutoConditional,
    Neighbors,
    LogitAttribution,
    ContrastiveDataset,
    Tokenize,
    Models,
    Map,
}

impl Route {
    /// Every route, in the order the API reference lists them.
    pub const ALL: [Route; 17] = [
        Route::ChatCompletions,
        Route::ComputeLogits,
        Route::ComputeFeatures,
        Route::Contrast,
        Route::Search,
        Route::Rerank,
        Route::List,
        Route::Lookup,
        Route::Dashboard,
        Route::AutoEdits,
        Route::AutoConditional,
        Route::Neighbors,
        Route::LogitAttribution,
        Route::ContrastiveDataset,
        Route::Tokenize,
        Route::Models,
        Route::Map,
    ];

    /// The method and the path under [`API_PREFIX`].
    pub fn endpoint(self) -> (Method, &'static str) {
        use Method::{Get, Post};
        match self {
            Route::ChatCompletions => (Post, "/chat/completions"),
            Route::ComputeLogits => (Post, "/chat-attribution/compute-logits"),
            Route::ComputeFeatures => (Post, "/chat-attribution/compute-features"),
            Route::Contrast => (Post, "/chat-attribution/contrast"),
            Route::Search => (Get, "/features/search"),
            Route::Rerank => (Post, "/features/rerank"),
            Route::List => (Get, "/features/"),
            Route::Lookup => (Post, "/features/lookup"),
            Route::Dashboard => (Post, "/features/dashboard"),
            Route::AutoEdits => (Post, "/features/auto-edits"),
            Route::AutoConditional => (Post, "/features/auto-conditional"),
            Route::Neighbors => (Post, "/attributions/neighbors"),
            Route::LogitAttribution => (Post, "/attributions/compute-logit-attribution"),
            Route::ContrastiveDataset => (Post, "/attributions/generate-contrastive-dataset"),
            Route::Tokenize => (Post, "/chat/tokenize"),
            Route::Models => (Get, "/models"),
            Route::Map => (Get, "/features/map"),
        }
    }

    pub fn method(self) -> Method {
        self.endpoint().0
    }

    pub fn path(self) -> &'static str {
        self.endpoint().1
    }

    /// The operation's name in messages (`POST /features/rerank`).
    pub fn name(self) -> String {
        format!("{} {}", self.method().as_str(), self.path())
    }

    /// Whether the route is also served under [`OPENAI_PREFIX`], for the OpenAI SDK.
    pub fn openai_alias(self) -> bool {
        matches!(self, Route::ChatCompletions | Route::Models)
    }

    /// Whether answering runs the model or scans the atlas (a server runs such work in one of
    /// its limited slots); the rest answer from tables at once.
    pub fn is_model_work(self) -> bool {
        !matches!(self, Route::Models | Route::List | Route::Map)
    }

    /// The route at `method` and `path` (under [`API_PREFIX`], without a query string).
    pub fn find(method: &str, path: &str) -> Option<Route> {
        Route::ALL
            .into_iter()
            .find(|r| r.method().as_str().eq_ignore_ascii_case(method) && r.path() == path)
    }
}

/// `GET features/search?query=&model=&perPage=` (`top_k` is accepted for `perPage`).
#[derive(Debug, Clone, PartialEq)]
pub struct SearchQuery {
    pub query: String,
    /// `None`: the provider's model.
    pub model: Option<String>,
    pub top_k: i64,
}

/// `GET features/?feature_id=a&feature_id=b`.
#[derive(Debug, Clone, PartialEq)]
pub struct ListQuery {
    pub feature_ids: Vec<String>,
}

/// `GET features/map?model=` (Kindling's own): the feature map.
#[derive(Debug, Clone, PartialEq)]
pub struct MapQuery {
    /// `None`: the provider's model.
    pub model: Option<String>,
}

/// A parsed request of one route.
#[derive(Debug, Clone)]
pub enum Request {
    Chat(ChatRequest),
    Logits(LogitsRequest),
    ComputeFeatures(ComputeFeaturesRequest),
    Contrast(ContrastRequest),
    Search(SearchQuery),
    Rerank(RerankRequest),
    List(ListQuery),
    Lookup(LookupRequest),
    Dashboard(DashboardRequest),
    AutoEdits(SpecificationRequest),
    AutoConditional(SpecificationRequest),
    Neighbors(NeighborsRequest),
    LogitAttribution(AttributionRequest),
    ContrastiveDataset(ContrastiveDatasetRequest),
    Tokenize(TokenizeRequest),
    Models,
    Map(MapQuery),
}

impl Request {
    /// A route's request from its query string (GET routes) or its JSON body (POST routes).
    /// A body that is not JSON is [`EmberError::Malformed`]; JSON of the wrong shape is
    /// [`EmberError::Invalid`].
    pub fn parse(route: Route, query: &str, body: &[u8]) -> Result<Request, EmberError> {
        match route.method() {
            Method::Get => Ok(Request::from_query(route, query)?),
            Method::Post => {
                let json: Value =
                    serde_json::from_slice(body).map_err(|e| EmberError::Malformed(format!("the request body is not JSON: {e}")))?;
                Request::from_json(route, json)
            }
        }
    }

    /// A POST route's request from its JSON body.
    pub fn from_json(route: Route, body: Value) -> Result<Request, EmberError> {
        fn typed<T: DeserializeOwned>(body: Value) -> Result<T, EmberError> {
            // The error names the field that does not fit (`messages[0].role: ...`).
            serde_path_to_error::deserialize(body).map_err(|e| EmberError::Invalid(format!("the request body does not fit: {e}")))
        }
        Ok(match route {
            Route::ChatCompletions => Request::Chat(typed(body)?),
            Route::ComputeLogits => Request::Logits(typed(body)?),
            Route::ComputeFeatures => Request::ComputeFeatures(typed(body)?),
            Route::Contrast => Request::Contrast(typed(body)?),
            Route::Rerank => Request::Rerank(typed(body)?),
            Route::Lookup => Request::Lookup(typed(body)?),
            Route::Dashboard => Request::Dashboard(typed(body)?),
            Route::AutoEdits => Request::AutoEdits(typed(body)?),
            Route::AutoConditional => Request::AutoConditional(typed(body)?),
            Route::Neighbors => Request::Neighbors(typed(body)?),
            Route::LogitAttribution => Request::LogitAttribution(typed(body)?),
            Route::ContrastiveDataset => Request::ContrastiveDataset(typed(body)?),
            Route::Tokenize => Request::Tokenize(typed(body)?),
            Route::Search | Route::List | Route::Models | Route::Map => return Request::from_query(route, ""),
        })
    }

    /// A GET route's request from its query string (repeated keys kept).
    pub fn from_query(route: Route, query: &str) -> Result<Request, EmberError> {
        let pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes()).into_owned().collect();
        let get = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        Ok(match route {
            Route::Search => {
                let query = get("query").ok_or_else(|| EmberError::Invalid("missing query parameter \"query\"".into()))?;
                let top_k = match get("perPage").or_else(|| get("top_k")) {
                    None => 10,
                    Some(v) => v
                        .parse::<i64>()
                        .map_err(|_| EmberError::Invalid(format!("perPage must be an integer, got {v:?}")))?,
                };
                Request::Search(SearchQuery {
                    query,
                    model: get("model"),
                    top_k,
                })
            }
            Route::List => Request::List(ListQuery {
                feature_ids: pairs.into_iter().filter(|(k, _)| k == "feature_id").map(|(_, v)| v).collect(),
            }),
            Route::Models => Request::Models,
            Route::Map => Request::Map(MapQuery { model: get("model") }),
            other => return Err(EmberError::Invalid(format!("{} takes a JSON body", other.name()))),
        })
    }

    pub fn route(&self) -> Route {
        match self {
            Request::Chat(_) => Route::ChatCompletions,
            Request::Logits(_) => Route::ComputeLogits,
            Request::ComputeFeatures(_) => Route::ComputeFeatures,
            Request::Contrast(_) => Route::Contrast,
            Request::Search(_) => Route::Search,
            Request::Rerank(_) => Route::Rerank,
            Request::List(_) => Route::List,
            Request::Lookup(_) => Route::Lookup,
            Request::Dashboard(_) => Route::Dashboard,
            Request::AutoEdits(_) => Route::AutoEdits,
            Request::AutoConditional(_) => Route::AutoConditional,
            Request::Neighbors(_) => Route::Neighbors,
            Request::LogitAttribution(_) => Route::LogitAttribution,
            Request::ContrastiveDataset(_) => Route::ContrastiveDataset,
            Request::Tokenize(_) => Route::Tokenize,
            Request::Models => Route::Models,
            Request::Map(_) => Route::Map,
        }
    }
}

/// What answers the API's operations: the local engine, or a remote service that can do some
/// of them. Every operation has a default that refuses it ([`EmberError::Unsupported`]), so a
/// provider implements what it can and the rest answer a clear error.
///
/// `Cancel` is how the caller stops long work (the engine's cancel token; a remote
/// provider's request abort).
pub trait Provider {
    type Cancel;

    /// The provider's name in messages ("Kindling's engine", "Neuronpedia").
    fn provider_name(&self) -> String;

    /// The model names it serves.
    fn models(&self) -> Vec<String>;

    /// The refusal of an operation this provider lacks.
    fn unsupported(&self, route: Route) -> EmberError {
        EmberError::Unsupported {
            operation: route.path(),
            provider: self.provider_name(),
            why: "this provider has no such operation".into(),
        }
    }

    /// A whole (non-streamed) chat completion.
    fn chat_completion(&self, _request: &ChatRequest, _cancel: &Self::Cancel) -> Result<ChatCompletion, EmberError> {
        Err(self.unsupported(Route::ChatCompletions))
    }
    fn compute_logits(&self, _request: &LogitsRequest, _cancel: &Self::Cancel) -> Result<LogitsResponse, EmberError> {
        Err(self.unsupported(Route::ComputeLogits))
    }
    fn compute_features(&self, _request: &ComputeFeaturesRequest, _cancel: &Self::Cancel) -> Result<TokenFeatures, EmberError> {
        Err(self.unsupported(Route::ComputeFeatures))
    }
    fn contrast(&self, _request: &ContrastRequest, _cancel: &Self::Cancel) -> Result<Contrast, EmberError> {
        Err(self.unsupported(Route::Contrast))
    }
    fn search(&self, _request: &SearchQuery) -> Result<Features, EmberError> {
        Err(self.unsupported(Route::Search))
    }
    fn rerank(&self, _request: &RerankRequest) -> Result<Features, EmberError> {
        Err(self.unsupported(Route::Rerank))
    }
    fn list(&self, _request: &ListQuery) -> Result<Features, EmberError> {
        Err(self.unsupported(Route::List))
    }
    fn lookup(&self, _request: &LookupRequest) -> Result<Lookup, EmberError> {
        Err(self.unsupported(Route::Lookup))
    }
    fn dashboard(&self, _request: &DashboardRequest) -> Result<Dashboard, EmberError> {
        Err(self.unsupported(Route::Dashboard))
    }
    fn auto_edits(&self, _request: &SpecificationRequest, _cancel: &Self::Cancel) -> Result<AutoEdits, EmberError> {
        Err(self.unsupported(Route::AutoEdits))
    }
    fn auto_conditional(&self, _request: &SpecificationRequest, _cancel: &Self::Cancel) -> Result<AutoConditional, EmberError> {
        Err(self.unsupported(Route::AutoConditional))
    }
    fn neighbors(&self, _request: &NeighborsRequest) -> Result<Neighbors, EmberError> {
        Err(self.unsupported(Route::Neighbors))
    }
    fn attribute(&self, _request: &AttributionRequest, _cancel: &Self::Cancel) -> Result<LogitAttribution, EmberError> {
        Err(self.unsupported(Route::LogitAttribution))
    }
    fn contrastive_dataset(&self, _request: &ContrastiveDatasetRequest, _cancel: &Self::Cancel) -> Result<ContrastiveDatasets, EmberError> {
        Err(self.unsupported(Route::ContrastiveDataset))
    }
    fn tokenize(&self, _request: &TokenizeRequest) -> Result<Tokens, EmberError> {
        Err(self.unsupported(Route::Tokenize))
    }
    fn feature_map(&self, _request: &MapQuery) -> Result<FeatureMap, EmberError> {
        Err(self.unsupported(Route::Map))
    }
}

/// The answer to one request. A streamed chat (`"stream": true`) is the shells' own: they
/// send its chunks as they come, so it does not pass through here.
pub fn dispatch<P: Provider + ?Sized>(provider: &P, request: &Request, cancel: &P::Cancel) -> Result<Value, EmberError> {
    match request {
        Request::Chat(r) => json(provider.chat_completion(r, cancel)?),
        Request::Logits(r) => json(provider.compute_logits(r, cancel)?),
        Request::ComputeFeatures(r) => json(provider.compute_features(r, cancel)?),
        Request::Contrast(r) => json(provider.contrast(r, cancel)?),
        Request::Search(r) => json(provider.search(r)?),
        Request::Rerank(r) => json(provider.rerank(r)?),
        Request::List(r) => json(provider.list(r)?),
        Request::Lookup(r) => json(provider.lookup(r)?),
        Request::Dashboard(r) => json(provider.dashboard(r)?),
        Request::AutoEdits(r) => json(provider.auto_edits(r, cancel)?),
        Request::AutoConditional(r) => json(provider.auto_conditional(r, cancel)?),
        Request::Neighbors(r) => json(provider.neighbors(r)?),
        Request::LogitAttribution(r) => json(provider.attribute(r, cancel)?),
        Request::ContrastiveDataset(r) => json(provider.contrastive_dataset(r, cancel)?),
        Request::Tokenize(r) => json(provider.tokenize(r)?),
        Request::Models => json(Models::of(&provider.models())),
        Request::Map(r) => json(provider.feature_map(r)?),
    }
}

/// A reply as JSON (replies are plain data: serializing them cannot fail).
fn json(reply: impl serde::Serialize) -> Result<Value, EmberError> {
    serde_json::to_value(reply).map_err(|e| EmberError::Failed(format!("a reply did not serialize: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_found_at_its_own_endpoint_and_nowhere_else() {
        for route in Route::ALL {
            assert_eq!(Route::find(route.method().as_str(), route.path()), Some(route), "{route:?}");
        }
        let mut endpoints: Vec<_> = Route::ALL.iter().map(|r| r.endpoint()).collect();
        endpoints.dedup();
        assert_eq!(endpoints.len(), Route::ALL.len(), "two routes share an endpoint");
        assert_eq!(Route::find("GET", "/chat/completions"), None);
        assert_eq!(Route::find("POST", "/features/search"), None);
        assert_eq!(Route::find("POST", "/no/such/path"), None);
    }

    #[test]
    fn requests_parse_from_queries_and_bodies_and_say_what_is_wrong() {
        let search = Request::parse(Route::Search, "query=pirate%20talk&perPage=3", b"").unwrap();
        assert!(matches!(&search, Request::Search(q) if q.query == "pirate talk" && q.top_k == 3 && q.model.is_none()));
        assert_eq!(search.route(), Route::Search);
        let bad_k = Request::parse(Route::Search, "query=x&perPage=lots", b"").unwrap_err();
        assert_eq!(bad_k.status(), 422);
        assert!(bad_k.to_string().contains("perPage"));
        assert_eq!(Request::parse(Route::Search, "", b"").unwrap_err().status(), 422);
        let list = Request::parse(Route::List, "feature_id=a&feature_id=b&other=c", b"").unwrap();
        assert!(matches!(list, Request::List(l) if l.feature_ids == ["a", "b"]));

        let lookup = Request::parse(Route::Lookup, "ignored", br#"{"indices": [1, 2], "model": "m"}"#);
        assert!(matches!(lookup, Ok(Request::Lookup(l)) if l.indices == [1, 2]));
        assert_eq!(Request::parse(Route::Lookup, "", b"{\"indices\": [").unwrap_err().status(), 400);
        let wrong_shape = Request::parse(Route::Lookup, "", br#"{"indices": "one", "model": "m"}"#).unwrap_err();
        assert_eq!(wrong_shape.status(), 422);
        assert!(wrong_shape.to_string().contains("indices"), "{wrong_shape}");
    }

    struct Nothing;
    impl Provider for Nothing {
        type Cancel = ();
        fn provider_name(&self) -> String {
            "a provider of nothing".into()
        }
        fn models(&self) -> Vec<String> {
            vec!["m".into()]
        }
    }

    #[test]
    fn a_provider_refuses_what_it_lacks_by_name() {
        let request = Request::parse(Route::Rerank, "", br#"{"query": "q", "model": "m", "feature_ids": []}"#).unwrap();
        let refused = dispatch(&Nothing, &request, &()).unwrap_err();
        assert_eq!(refused.status(), 422);
        assert!(refused.to_string().contains("a provider of nothing") && refused.to_string().contains("/features/rerank"));
        let models = dispatch(&Nothing, &Request::Models, &()).unwrap();
        assert_eq!(models["data"][0]["id"], "m");
    }
}
