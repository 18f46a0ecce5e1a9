//! The atlas API on a small hand-made SAE and atlas: loading and its errors, search,
//! rerank, neighbours and contexts.

use std::collections::HashMap;

use kindling_engine::atlas::{ATLAS_VERSION, AtlasIndex, AtlasSae, NO_TOKEN};
use kindling_engine::sae::saelens_cfg;
use kindling_engine::{Atlas, AtlasError, FeatureInfo, LabelSource, Sae, SaeConfig, StaticEmbedder, WordPiece};
use safetensors::Dtype;
use safetensors::tensor::TensorView;

const D_IN: usize = 4;
const D_SAE: usize = 5;

/// Decoder rows: 0 and 1 point almost the same way, 2 is between them and 3, 4 is opposite.
fn sae_bytes() -> Vec<u8> {
    let w_dec = vec![
        1.0, 0.0, 0.0, 0.0, //
        0.9, 0.1, 0.0, 0.0, //
        0.5, 0.0, 0.5, 0.0, //
        0.0, 0.0, 1.0, 0.0, //
        -1.0, 0.0, 0.0, 0.0,
    ];
    let cfg = SaeConfig {
        d_in: D_IN,
        d_sae: D_SAE,
        k: 2,
        layer: 3,
        model_sha256: None,
    };
    let sae = Sae::new(cfg.clone(), vec![0.1; D_IN * D_SAE], vec![0.0; D_SAE], w_dec, vec![0.0; D_IN]).unwrap();
    sae.to_safetensors(true, &saelens_cfg(&cfg, &HashMap::new())).unwrap()
}

/// A toy embedder: each word is a direction, "funny" and "jokes" share one.
fn embedder() -> StaticEmbedder {
    let vocab = [
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "funny", "jokes", "pirate", "ships", "french", "the",
    ];
    let wordpiece = WordPiece::from_tokens(vocab.iter().map(|t| t.to_string()).collect()).unwrap();
    let rows: [[f32; 3]; 10] = [
        [0.0; 3],
        [0.0; 3],
        [0.0; 3],
        [0.0; 3],
        [1.0, 0.0, 0.0],
        [0.9, 0.1, 0.0],
        [0.0, 1.0, 0.0],
        [0.1, 0.9, 0.0],
        [0.0, 0.0, 1.0],
        [0.01, 0.01, 0.01],
    ];
    StaticEmbedder::new(wordpiece, rows.iter().flatten().copied().collect(), 3).unwrap()
}

fn feature(label: &str, source: LabelSource) -> FeatureInfo {
    FeatureInfo {
        label: label.into(),
        label_source: source,
        label_score: Some(0.8),
        max_activation: 2.0,
        max_observed: 3.0,
        density: 0.01,
        histogram: vec![3, 2, 1],
        promoted: vec![(7, 1.5)],
        suppressed: vec![(8, -1.5)],
        boosted: vec![(7, 0.02)],
        top_tokens: vec![(5, 3)],
    }
}

fn index(compact_sha256: &str) -> AtlasIndex {
    AtlasIndex {
        format: "kindling-atlas".into(),
        version: ATLAS_VERSION,
        sae: AtlasSae {
            layer: 3,
            d_sae: D_SAE,
            compact_sha256: compact_sha256.into(),
            saelens_sha256: "other".into(),
        },
        model_sha256: "m".into(),
        embedder_sha256: "e".into(),
        features: vec![
            feature("funny jokes", LabelSource::Model),
            feature("pirate ships", LabelSource::Model),
            feature("french", LabelSource::Tokens),
            feature("jokes", LabelSource::Model),
            feature("", LabelSource::Dead),
        ],
    }
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(bytes))
}

fn load() -> (Atlas, Sae, Vec<u8>) {
    let bytes = sae_bytes();
    let sae = Sae::from_compact(&bytes).unwrap();
    let json = serde_json::to_string(&index(&sha256(&bytes))).unwrap();
    (Atlas::from_index(&json, &sae, embedder()).unwrap(), sae, bytes)
}

#[test]
fn search_finds_labels_by_meaning_and_skips_dead_latents() {
    let (atlas, _, _) = load();
    let hits = atlas.search("funny", 10);
    assert_eq!(hits[0].feature, 0);
    assert_eq!(hits[1].feature, 3);
    assert!(hits.iter().all(|h| h.feature != 4), "a dead latent is never a result");
    assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
    assert_eq!(atlas.search("pirate", 1)[0].feature, 1);
    let reranked = atlas.rerank(&[1, 2, 3], "jokes", 2).unwrap();
    assert_eq!(reranked.iter().map(|h| h.feature).collect::<Vec<_>>(), [3, 1]);
    assert!(matches!(
        atlas.rerank(&[9], "x", 1),
        Err(AtlasError::UnknownFeature { feature: 9, d_sae: 5 })
    ));
    assert_eq!(atlas.units(), [2.0; 5]);
}

#[test]
fn neighbours_exclude_the_group_and_come_sorted() {
    let (atlas, sae, _) = load();
    let hits = atlas.neighbors(&sae, &[0], 4).unwrap();
    assert_eq!(hits.iter().map(|h| h.feature).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert!((hits[0].score - 0.9 / (0.82f32).sqrt()).abs() < 1e-3, "cosine, not dot product");
    assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
    // A group's centroid: 0 and 3 together sit closest to 2, their midpoint.
    let group = atlas.neighbors(&sae, &[0, 3], 1).unwrap();
    assert_eq!(group[0].feature, 2);
    assert!((group[0].score - 1.0).abs() < 1e-3);
    assert!(atlas.neighbors(&sae, &[5], 1).is_err());
}

#[test]
fn a_mismatched_or_broken_index_is_refused_with_a_clear_error() {
    let bytes = sae_bytes();
    let sae = Sae::from_compact(&bytes).unwrap();
    let other = serde_json::to_string(&index("0123")).unwrap();
    let err = Atlas::from_index(&other, &sae, embedder()).unwrap_err();
    assert!(matches!(err, AtlasError::WrongSae(_)), "{err}");
    assert!(err.to_string().contains("another SAE"), "{err}");

    let good = serde_json::to_string(&index(&sha256(&bytes))).unwrap();
    let err = Atlas::from_index(&good[..good.len() / 2], &sae, embedder()).unwrap_err();
    assert!(matches!(err, AtlasError::Index(_)), "{err}");

    let mut fewer = index(&sha256(&bytes));
    fewer.features.pop();
    let err = Atlas::from_index(&serde_json::to_string(&fewer).unwrap(), &sae, embedder()).unwrap_err();
    assert!(err.to_string().contains("4 feature entries for 5 latents"), "{err}");

    let mut future = index(&sha256(&bytes));
    future.version = ATLAS_VERSION + 1;
    assert!(Atlas::from_index(&serde_json::to_string(&future).unwrap(), &sae, embedder()).is_err());
}

fn contexts_bytes(compact_sha256: &str) -> Vec<u8> {
    let (n, w) = (2, 3);
    let mut tokens = vec![NO_TOKEN; D_SAE * n * w];
    let mut acts = vec![0u8; D_SAE * n * w];
    let mut peaks = vec![0f32; D_SAE * n];
    // Feature 1, slot 0: tokens 6 7 (padding after), peak 2.0 at the second.
    tokens[(n * w)..(n * w) + 2].copy_from_slice(&[6, 7]);
    acts[(n * w)..(n * w) + 2].copy_from_slice(&[51, 255]);
    peaks[n] = 2.0;
    let token_bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    let peak_bytes: Vec<u8> = peaks.iter().flat_map(|p| p.to_le_bytes()).collect();
    let views = [
        ("tokens", TensorView::new(Dtype::U16, vec![D_SAE, n, w], &token_bytes).unwrap()),
        ("activations", TensorView::new(Dtype::U8, vec![D_SAE, n, w], &acts).unwrap()),
        ("peaks", TensorView::new(Dtype::F32, vec![D_SAE, n], &peak_bytes).unwrap()),
    ];
    // `collect` builds whichever map type safetensors was compiled with (std or alloc).
    let meta = [(
        "kindling_atlas_contexts".to_string(),
        serde_json::json!({ "version": ATLAS_VERSION, "compact_sha256": compact_sha256 }).to_string(),
    )]
    .into_iter()
    .collect();
    safetensors::serialize(views, Some(meta)).unwrap()
}

#[test]
fn contexts_load_lazily_and_are_checked() {
    let (mut atlas, _, bytes) = load();
    assert!(matches!(atlas.contexts(1), Err(AtlasError::NoContexts)));
    let good = contexts_bytes(&sha256(&bytes));
    assert!(atlas.load_contexts(&good[..good.len() - 10]).is_err(), "truncated");
    assert!(matches!(atlas.load_contexts(&contexts_bytes("beef")), Err(AtlasError::WrongSae(_))));
    atlas.load_contexts(&good).unwrap();
    let contexts = atlas.contexts(1).unwrap();
    assert_eq!(contexts.len(), 1, "empty slots are skipped");
    assert_eq!(contexts[0].tokens, [6, 7]);
    assert!((contexts[0].activations[0] - 0.4).abs() < 1e-6 && contexts[0].peak() == 2.0);
    assert!(atlas.contexts(0).unwrap().is_empty());
    assert!(atlas.contexts(7).is_err());
}

fn map_bytes(compact_sha256: &str, regions: &[&str], region_of: [u8; D_SAE]) -> Vec<u8> {
    use kindling_engine::atlas::MAP_VERSION;
    // Latent i at (i / 4, 1 - i / 4) of the unit square.
    let xy: Vec<u8> = (0..D_SAE as u32)
        .flat_map(|i| {
            let x = (i * 65535 / 4) as u16;
            [x, 65535 - x]
        })
        .flat_map(u16::to_le_bytes)
        .collect();
    let views = [
        ("xy", TensorView::new(Dtype::U16, vec![D_SAE, 2], &xy).unwrap()),
        ("region", TensorView::new(Dtype::U8, vec![D_SAE], &region_of).unwrap()),
    ];
    let meta = [(
        "kindling_atlas_map".to_string(),
        serde_json::json!({ "version": MAP_VERSION, "compact_sha256": compact_sha256, "atlas_sha256": "a", "regions": regions })
            .to_string(),
    )]
    .into_iter()
    .collect();
    safetensors::serialize(views, Some(meta)).unwrap()
}

#[test]
fn the_map_places_live_latents_and_is_checked() {
    use kindling_engine::atlas::NO_REGION;
    let (mut atlas, _, bytes) = load();
    assert!(atlas.map().is_none(), "an atlas loads without a map");
    let sha = sha256(&bytes);
    let good = map_bytes(&sha, &["jokes", "pirates"], [0, 1, 1, 0, NO_REGION]);
    assert!(atlas.load_map(&good[..good.len() - 3]).is_err(), "truncated");
    assert!(matches!(
        atlas.load_map(&map_bytes("beef", &["a", "b"], [0; D_SAE])),
        Err(AtlasError::WrongSae(_))
    ));
    let unnamed = atlas.load_map(&map_bytes(&sha, &["only one"], [0, 1, 0, 0, 0])).unwrap_err();
    assert!(unnamed.to_string().contains("region 1 of 1"), "{unnamed}");
    assert!(atlas.load_contexts(&good).is_err(), "a map is not contexts");

    atlas.load_map(&good).unwrap();
    let map = atlas.map().unwrap();
    assert_eq!(map.regions, ["jokes", "pirates"]);
    assert_eq!(map.points[4], None, "a dead latent is not drawn");
    let p = map.points[2].unwrap();
    assert!((p.x - 0.5).abs() < 1e-4 && (p.y - 0.5).abs() < 1e-4 && p.region == 1, "{p:?}");
    // Region 0 holds latents 0 (0, 1) and 3 (0.75, 0.25); region 1 holds 1 and 2.
    let centres = map.region_centres();
    let (x, y) = centres[0].unwrap();
    assert!((x - 0.375).abs() < 1e-4 && (y - 0.625).abs() < 1e-4, "{centres:?}");
}

/// The shipped map: every live latent has a place, it was laid out from the labels that ship
/// beside it, and a search's hits sit together on it (what makes lighting them up useful).
#[test]
fn the_shipped_map_matches_its_labels_and_gathers_search_hits() {
    let root = crate::common::repo_root().join("public");
    let sae = Sae::from_compact(&std::fs::read(root.join("sae/kindling-sae.f16.safetensors")).unwrap()).unwrap();
    let atlas = Atlas::load_dir(&root.join("atlas"), &sae, false).unwrap();
    let map = atlas.map().expect("public/atlas/map.safetensors");
    let live = atlas.index().features.iter().filter(|f| f.is_live()).count();
    let drawn = map.points.iter().flatten().count();
    assert!(drawn + 10 >= live && drawn <= live, "{drawn} points for {live} live latents");
    assert_eq!(
        map.atlas_sha256,
        sha256(&std::fs::read(root.join("atlas/atlas.json")).unwrap()),
        "the map was laid out from other labels: run scripts/build-map.sh"
    );
    let spread = |features: &[u32]| {
        let at: Vec<_> = features.iter().filter_map(|&f| map.points[f as usize]).collect();
        let mut sum = 0.0;
        for a in &at {
            for b in &at {
                sum += ((a.x - b.x).powi(2) + (a.y - b.y).powi(2)).sqrt();
            }
        }
        sum / (at.len() * at.len()) as f32
    };
    let everyone: Vec<u32> = (0..atlas.d_sae() as u32).step_by(41).collect();
    for query in ["numbers", "food", "places and countries"] {
        let hits: Vec<u32> = atlas.search(query, 20).iter().map(|h| h.feature).collect();
        let (near, all) = (spread(&hits), spread(&everyone));
        assert!(
            near < 0.5 * all,
            "{query:?}: hits {near:.3} apart on average, any two latents {all:.3}"
        );
    }
}
