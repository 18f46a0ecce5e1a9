//! The feature atlas: what every SAE latent is (label, statistics, logit effects, top
//! contexts) and search over all of them by meaning.
//!
//! Built offline by `kindling-build atlas` into `public/atlas/`:
//! * `atlas.json`: the index, one entry per latent (label, max activation, density,
//!   histogram, promoted/suppressed/boosted tokens), with the SHA-256 of the SAE it describes;
//! * `contexts.safetensors`: the top activating contexts, loaded lazily (dashboards and token
//!   overlays need them, search does not);
//! * `embedder.safetensors`: the static sentence embedder (see [`crate::embed`]);
//! * `map.safetensors` (optional): every live latent's place on the Features tab's map
//!   ([`FeatureMap`]; built by `tools/atlas/map.py` from the labels' meaning).
//!
//! Steering values are expressed in units of a feature's [`max_activation`](FeatureInfo::max_activation):
//! a high quantile of its activations on held-out text, not a single outlier.

use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::embed::StaticEmbedder;
use crate::sae::Sae;
use crate::tokenizer::TokenId;

/// The atlas format this code reads and writes.
pub const ATLAS_VERSION: u64 = 1;
/// The feature map's format version ([`FeatureMap`]).
pub const MAP_VERSION: u64 = 1;
/// The feature map's file in an atlas directory.
pub const MAP_FILE: &str = "map.safetensors";
/// Marks the padding of a context shorter than the window in `contexts.safetensors`.
pub const NO_TOKEN: u16 = u16::MAX;

#[derive(Debug, thiserror::Error)]
pub enum AtlasError {
    #[error("atlas index: {0}")]
    Index(String),
    #[error("atlas contexts: {0}")]
    Contexts(String),
    #[error("this atlas describes another SAE: {0}")]
    WrongSae(String),
    #[error("feature {feature} does not exist (the SAE has {d_sae} latents)")]
    UnknownFeature { feature: u32, d_sae: usize },
    #[error("the atlas's contexts are not loaded")]
    NoContexts,
    #[error("atlas map: {0}")]
    Map(String),
}

/// The SAE an atlas describes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AtlasSae {
    pub layer: usize,
    pub d_sae: usize,
    /// SHA-256 of the compact file (`kindling-sae.f16.safetensors`).
    pub compact_sha256: String,
    /// SHA-256 of the SAELens weights (`sae_weights.safetensors`).
    pub saelens_sha256: String,
}

/// Where a label came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelSource {
    /// Written by the instruct model from the feature's contexts and tokens.
    Model,
    /// Built from the feature's activating and promoted tokens (the model's answer was
    /// unusable or described the contexts worse).
    Tokens,
    /// The latent never fired on held-out text.
    Dead,
}

/// What the atlas knows about one latent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureInfo {
    pub label: String,
    pub label_source: LabelSource,
    /// Detection balanced accuracy of the label on held-out contexts (0.5 = chance).
    pub label_score: Option<f32>,
    /// The unit of activations (conditions, inspection; the steering unit before strength
    /// unit 2): the 99th percentile of its nonzero activations.
    pub max_activation: f32,
    /// The largest activation seen.
    pub max_observed: f32,
    /// Share of held-out tokens on which it fires.
    pub density: f32,
    /// Counts of its nonzero activations in equal bins over `(0, max_observed]`.
    pub histogram: Vec<u32>,
    /// Tokens its decoder direction promotes most through the unembedding (id, logit).
    pub promoted: Vec<(TokenId, f32)>,
    /// Tokens it suppresses most (id, logit).
    pub suppressed: Vec<(TokenId, f32)>,
    /// Tokens whose next-token probability rises most when it is amplified (id, Δp).
    pub boosted: Vec<(TokenId, f32)>,
    /// The tokens it fires on most often in its contexts (id, count).
    pub top_tokens: Vec<(TokenId, u32)>,
}

impl FeatureInfo {
    pub fn is_live(&self) -> bool {
        self.label_source != LabelSource::Dead
    }
}

/// `atlas.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AtlasIndex {
    pub format: String,
    pub version: u64,
    pub sae: AtlasSae,
    pub model_sha256: String,
    pub embedder_sha256: String,
    pub features: Vec<FeatureInfo>,
}

/// A window of held-out text around one activation of a feature.
#[derive(Debug, Clone, PartialEq)]
pub struct Context {
    pub tokens: Vec<TokenId>,
    /// The feature's activation at each token.
    pub activations: Vec<f32>,
}

impl Context {
    /// The largest activation in the window.
    pub fn peak(&self) -> f32 {
        self.activations.iter().copied().fold(0.0, f32::max)
    }
}

/// `contexts.safetensors`: `tokens` u16 `[d_sae, n, window]` (padding [`NO_TOKEN`]),
/// `activations` u8 `[d_sae, n, window]` (fraction of the context's peak, ×255) and `peaks`
/// f32 `[d_sae, n]` (0 for an empty slot); metadata `kindling_atlas_contexts` holds
/// `{"version", "compact_sha256"}`.
#[derive(Debug, Clone)]
struct Contexts {
    per_feature: usize,
    window: usize,
    tokens: Vec<u16>,
    activations: Vec<u8>,
    peaks: Vec<f32>,
}

/// A search result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub feature: u32,
    pub score: f32,
}

/// The atlas of one SAE, ready to search.
#[derive(Debug, Clone)]
pub struct Atlas {
    index: AtlasIndex,
    embedder: StaticEmbedder,
    /// `[d_sae, dim]`: each label's embedding (zero for dead latents).
    label_vectors: Vec<f32>,
    contexts: Option<Contexts>,
    map: Option<FeatureMap>,
}

/// Where [`FeatureMap`] marks a latent it does not draw (a dead one).
pub const NO_REGION: u8 = u8::MAX;

/// The feature map (`map.safetensors`): each live latent's place in the unit square, laid out
/// offline by UMAP on its label's embedding (so related labels sit together, and search hits,
/// ranked on the same embeddings, form a region), and the named regions of the layout.
///
/// File: `xy` u16 `[d_sae, 2]` (each axis scaled to 0..=65535), `region` u8 `[d_sae]`
/// ([`NO_REGION`] for a latent not drawn); metadata `kindling_atlas_map` holds `{"version",
/// "compact_sha256", "atlas_sha256", "regions": [names]}`.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureMap {
    /// Per latent, its position, or `None` for a latent the map leaves out.
    pub points: Vec<Option<MapPoint>>,
    /// The regions' names, by region number.
    pub regions: Vec<String>,
    /// SHA-256 of the `atlas.json` whose labels placed the points.
    pub atlas_sha256: String,
}

/// One latent on the [`FeatureMap`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MapPoint {
    /// In `[0, 1]`, left to right.
    pub x: f32,
    /// In `[0, 1]`, top to bottom.
    pub y: f32,
    pub region: u8,
}

impl FeatureMap {
    /// The centre of each region (the mean of its points), by region number; `None` for a
    /// region without points.
    pub fn region_centres(&self) -> Vec<Option<(f32, f32)>> {
        let mut sums = vec![(0f32, 0f32, 0u32); self.regions.len()];
        for p in self.points.iter().flatten() {
            let s = &mut sums[p.region as usize];
            *s = (s.0 + p.x, s.1 + p.y, s.2 + 1);
        }
        sums.into_iter()
            .map(|(x, y, n)| (n > 0).then(|| (x / n as f32, y / n as f32)))
            .collect()
    }
}

impl Atlas {
    /// Loads `atlas.json` for `sae` and embeds every label with `embedder`.
    pub fn from_index(index_json: &str, sae: &Sae, embedder: StaticEmbedder) -> Result<Self, AtlasError> {
        let index: AtlasIndex = serde_json::from_str(index_json).map_err(|e| AtlasError::Index(e.to_string()))?;
        if index.format != "kindling-atlas" || index.version != ATLAS_VERSION {
            return Err(AtlasError::Index(format!(
                "format {:?} version {}, this build reads kindling-atlas version {ATLAS_VERSION}",
                index.format, index.version
            )));
        }
        let cfg = sae.config();
        if index.sae.d_sae != cfg.d_sae || index.sae.layer != cfg.layer {
            return Err(AtlasError::WrongSae(format!(
                "the atlas is for {} latents at block {}, the SAE has {} at block {}",
                index.sae.d_sae, index.sae.layer, cfg.d_sae, cfg.layer
            )));
        }
        if let Some(sha) = sae.sha256()
            && sha != index.sae.compact_sha256
            && sha != index.sae.saelens_sha256
        {
            return Err(AtlasError::WrongSae(format!(
                "SAE file sha256 {sha}, atlas built for {}",
                index.sae.compact_sha256
            )));
        }
        if index.features.len() != cfg.d_sae {
            return Err(AtlasError::Index(format!(
                "{} feature entries for {} latents",
                index.features.len(),
                cfg.d_sae
            )));
        }
        let dim = embedder.dim();
        let len = cfg
            .d_sae
            .checked_mul(dim)
            .ok_or_else(|| AtlasError::Index("too many label vectors".into()))?;
        let mut label_vectors = vec![0f32; len];
        for (f, row) in index.features.iter().zip(label_vectors.chunks_exact_mut(dim)) {
            if f.is_live() {
                row.copy_from_slice(&embedder.embed(&f.label));
            }
        }
        Ok(Self {
            index,
            embedder,
            label_vectors,
            contexts: None,
            map: None,
        })
    }

    /// Loads an atlas directory as `kindling-build atlas` writes it: the index and the
    /// embedder, and the contexts when `with_contexts`.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn load_dir(dir: &std::path::Path, sae: &Sae, with_contexts: bool) -> Result<Self, crate::EngineError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|source| crate::EngineError::Io {
                path: path.display().to_string(),
                source,
            })
        };
        let index = String::from_utf8(read("atlas.json")?).map_err(|e| AtlasError::Index(e.to_string()))?;
        let embedder = StaticEmbedder::from_safetensors(&read("embedder.safetensors")?)?;
        let mut atlas = Self::from_index(&index, sae, embedder)?;
        if with_contexts {
            atlas.load_contexts(&read("contexts.safetensors")?)?;
        }
        // The map is optional: an atlas without one serves everything else.
        if dir.join(MAP_FILE).exists() {
            atlas.load_map(&read(MAP_FILE)?)?;
        }
        Ok(atlas)
    }

    /// SHA-256 of the SAE file this atlas belongs to (feature ids are made from it).
    pub fn sae_sha256(&self) -> &str {
        &self.index.sae.compact_sha256
    }

    /// Adds the top contexts (`contexts.safetensors`).
    pub fn load_contexts(&mut self, bytes: &[u8]) -> Result<(), AtlasError> {
        let bad = |m: String| AtlasError::Contexts(m);
        self.checked_metadata(bytes, "kindling_atlas_contexts", ATLAS_VERSION, "contexts", bad)?;
        let file = SafeTensors::deserialize(bytes).map_err(|e| bad(format!("cannot read tensors: {e}")))?;
        let d_sae = self.index.sae.d_sae;
        let tokens = file.tensor("tokens").map_err(|e| bad(format!("tokens: {e}")))?;
        let (per_feature, window) = match tokens.shape() {
            &[d, n, w] if d == d_sae && tokens.dtype() == Dtype::U16 => (n, w),
            other => {
                return Err(bad(format!(
                    "tokens must be u16 [{d_sae}, n, window], found {:?} {other:?}",
                    tokens.dtype()
                )));
            }
        };
        let activations = file.tensor("activations").map_err(|e| bad(format!("activations: {e}")))?;
        let peaks = file.tensor("peaks").map_err(|e| bad(format!("peaks: {e}")))?;
        if activations.dtype() != Dtype::U8 || activations.shape() != [d_sae, per_feature, window] {
            return Err(bad("activations must be u8 and shaped like tokens".into()));
        }
        if peaks.dtype() != Dtype::F32 || peaks.shape() != [d_sae, per_feature] {
            return Err(bad(format!("peaks must be f32 [{d_sae}, {per_feature}]")));
        }
        self.contexts = Some(Contexts {
            per_feature,
            window,
            tokens: tokens.data().chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect(),
            activations: activations.data().to_vec(),
            peaks: peaks
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        });
        Ok(())
    }

    /// The JSON metadata under `key` of an atlas safetensors file, checked: format `version`,
    /// and built for this atlas's SAE. `what` names the file in a wrong-SAE error; `bad`
    /// makes the file's own error.
    fn checked_metadata(
        &self,
        bytes: &[u8],
        key: &str,
        version: u64,
        what: &str,
        bad: impl Fn(String) -> AtlasError,
    ) -> Result<serde_json::Value, AtlasError> {
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let meta = header.metadata().as_ref().and_then(|m| m.get(key)).cloned();
        let meta: serde_json::Value =
            serde_json::from_str(&meta.ok_or_else(|| bad(format!("no {key} metadata")))?).map_err(|e| bad(format!("metadata: {e}")))?;
        if meta["version"].as_u64() != Some(version) {
            return Err(bad(format!("version {}, this build reads {version}", meta["version"])));
        }
        if meta["compact_sha256"].as_str() != Some(self.index.sae.compact_sha256.as_str()) {
            return Err(AtlasError::WrongSae(format!("{what} built for SAE {}", meta["compact_sha256"])));
        }
        Ok(meta)
    }

    /// Adds the feature map (`map.safetensors`, see [`FeatureMap`]).
    pub fn load_map(&mut self, bytes: &[u8]) -> Result<(), AtlasError> {
        let bad = |m: String| AtlasError::Map(m);
        let meta = self.checked_metadata(bytes, "kindling_atlas_map", MAP_VERSION, "map", bad)?;
        let regions: Vec<String> = meta["regions"]
            .as_array()
            .ok_or_else(|| bad("metadata has no regions".into()))?
            .iter()
            .map(|r| {
                r.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad("region names must be strings".into()))
            })
            .collect::<Result<_, _>>()?;
        if regions.len() >= NO_REGION as usize {
            return Err(bad(format!("{} regions, at most {}", regions.len(), NO_REGION - 1)));
        }
        let file = SafeTensors::deserialize(bytes).map_err(|e| bad(format!("cannot read tensors: {e}")))?;
        let d_sae = self.index.sae.d_sae;
        let xy = file.tensor("xy").map_err(|e| bad(format!("xy: {e}")))?;
        let region = file.tensor("region").map_err(|e| bad(format!("region: {e}")))?;
        if xy.dtype() != Dtype::U16 || xy.shape() != [d_sae, 2] {
            return Err(bad(format!("xy must be u16 [{d_sae}, 2], found {:?} {:?}", xy.dtype(), xy.shape())));
        }
        if region.dtype() != Dtype::U8 || region.shape() != [d_sae] {
            return Err(bad(format!(
                "region must be u8 [{d_sae}], found {:?} {:?}",
                region.dtype(),
                region.shape()
            )));
        }
        let unit = |b: &[u8]| f32::from(u16::from_le_bytes([b[0], b[1]])) / f32::from(u16::MAX);
        let points = xy
            .data()
            .chunks_exact(4)
            .zip(region.data())
            .map(|(xy, &r)| match r {
                NO_REGION => Ok(None),
                r if (r as usize) < regions.len() => Ok(Some(MapPoint {
                    x: unit(&xy[..2]),
                    y: unit(&xy[2..]),
                    region: r,
                })),
                r => Err(bad(format!("region {r} of {} named", regions.len()))),
            })
            .collect::<Result<_, _>>()?;
        self.map = Some(FeatureMap {
            points,
            regions,
            atlas_sha256: meta["atlas_sha256"].as_str().unwrap_or_default().to_string(),
        });
        Ok(())
    }

    /// The feature map, when one was loaded ([`Atlas::load_map`]).
    pub fn map(&self) -> Option<&FeatureMap> {
        self.map.as_ref()
    }

    pub fn index(&self) -> &AtlasIndex {
        &self.index
    }

    pub fn embedder(&self) -> &StaticEmbedder {
        &self.embedder
    }

    pub fn d_sae(&self) -> usize {
        self.index.sae.d_sae
    }

    fn check(&self, feature: u32) -> Result<usize, AtlasError> {
        let d_sae = self.d_sae();
        if (feature as usize) < d_sae {
            Ok(feature as usize)
        } else {
            Err(AtlasError::UnknownFeature { feature, d_sae })
        }
    }

    /// Every latent's steering unit, its `max_activation` (1.0 for a latent that never fired,
    /// whose scale is unknown), for [`Steer`](crate::Steer).
    pub fn units(&self) -> Vec<f32> {
        self.index
            .features
            .iter()
            .map(|f| if f.max_activation > 0.0 { f.max_activation } else { 1.0 })
            .collect()
    }

    pub fn feature(&self, feature: u32) -> Result<&FeatureInfo, AtlasError> {
        Ok(&self.index.features[self.check(feature)?])
    }

    /// The stored contexts of `feature`, strongest first.
    pub fn contexts(&self, feature: u32) -> Result<Vec<Context>, AtlasError> {
        let f = self.check(feature)?;
        let c = self.contexts.as_ref().ok_or(AtlasError::NoContexts)?;
        let mut out = Vec::new();
        for slot in 0..c.per_feature {
            let peak = c.peaks[f * c.per_feature + slot];
            if peak <= 0.0 {
                continue;
            }
            let at = (f * c.per_feature + slot) * c.window;
            let (mut tokens, mut activations) = (Vec::new(), Vec::new());
            for i in at..at + c.window {
                if c.tokens[i] != NO_TOKEN {
                    tokens.push(c.tokens[i] as TokenId);
                    activations.push(c.activations[i] as f32 / 255.0 * peak);
                }
            }
            out.push(Context { tokens, activations });
        }
        Ok(out)
    }

    /// The `top_k` live features whose labels are closest in meaning to `query`.
    pub fn search(&self, query: &str, top_k: usize) -> Vec<Hit> {
        let all: Vec<u32> = (0..self.d_sae() as u32).collect();
        self.rank(&all, query, top_k)
    }

    /// `features` reordered by how close their labels are to `query`, best `top_k` first.
    pub fn rerank(&self, features: &[u32], query: &str, top_k: usize) -> Result<Vec<Hit>, AtlasError> {
        for &f in features {
            self.check(f)?;
        }
        Ok(self.rank(features, query, top_k))
    }

    fn rank(&self, features: &[u32], query: &str, top_k: usize) -> Vec<Hit> {
        let q = self.embedder.embed(query);
        let dim = self.embedder.dim();
        let hits = features.iter().filter(|&&f| self.index.features[f as usize].is_live()).map(|&f| {
            let row = &self.label_vectors[f as usize * dim..(f as usize + 1) * dim];
            Hit {
                feature: f,
                score: row.iter().zip(&q).map(|(a, b)| a * b).sum(),
            }
        });
        top_hits(hits, top_k)
    }

    /// The `top_k` latents whose decoder directions are closest (cosine) to the centroid of
    /// `group`'s directions, the group itself excluded; one feature is a group of one.
    pub fn neighbors(&self, sae: &Sae, group: &[u32], top_k: usize) -> Result<Vec<Hit>, AtlasError> {
        for &f in group {
            self.check(f)?;
        }
        Ok(decoder_neighbors(sae, group, top_k))
    }
}

/// The decoder-cosine neighbours of a group's centroid (see [`Atlas::neighbors`]).
pub fn decoder_neighbors(sae: &Sae, group: &[u32], top_k: usize) -> Vec<Hit> {
    let d = sae.config().d_in;
    let unit = |row: &[f32]| {
        let mut v = row.to_vec();
        crate::embed::normalize(&mut v);
        v
    };
    let mut centroid = vec![0f32; d];
    for &f in group {
        centroid
            .iter_mut()
            .zip(unit(sae.decoder_row(f as usize)))
            .for_each(|(c, x)| *c += x);
    }
    crate::embed::normalize(&mut centroid);
    let hits = (0..sae.config().d_sae as u32).filter(|f| !group.contains(f)).map(|f| {
        let row = sae.decoder_row(f as usize);
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::MIN_POSITIVE);
        Hit {
            feature: f,
            score: row.iter().zip(&centroid).map(|(a, b)| a * b).sum::<f32>() / norm,
        }
    });
    top_hits(hits, top_k)
}

/// The `k` best hits, best first (ties by feature id).
fn top_hits(hits: impl Iterator<Item = Hit>, k: usize) -> Vec<Hit> {
    let mut all: Vec<Hit> = hits.collect();
    all.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.feature.cmp(&b.feature)));
    all.truncate(k);
    all
}
