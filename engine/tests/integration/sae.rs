//! The SAE API: loading and its errors, numerics against a straightforward implementation,
//! and the hooks on the real model.

use crate::common::{ids, model, prompt};
use kindling_engine::sae::{saelens_cfg, saelens_from_compact, top_k_positive};
use kindling_engine::{Backend, FeatureCapture, Logits, ResidualHook, Sae, SaeConfig, SaeError, Splice, SpliceMode};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const D: usize = 576;

fn random_sae(d_in: usize, d_sae: usize, k: usize, layer: usize, seed: u64) -> Sae {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut v = |n: usize, scale: f32| (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale).collect::<Vec<f32>>();
    let cfg = SaeConfig {
        d_in,
        d_sae,
        k,
        layer,
        model_sha256: None,
    };
    Sae::new(cfg, v(d_in * d_sae, 0.1), v(d_sae, 0.5), v(d_sae * d_in, 0.2), v(d_in, 0.3)).unwrap()
}

fn compact_bytes(sae: &Sae, as_f16: bool) -> Vec<u8> {
    sae.to_safetensors(as_f16, &saelens_cfg(sae.config(), &Default::default())).unwrap()
}

/// The straightforward definition, written without the engine's gemm or selection.
fn naive_encode(sae: &Sae, x: &[f32]) -> Vec<(u32, f32)> {
    let [(_, w_enc, _), (_, b_enc, _), _, (_, b_dec, _)] = sae.tensors();
    let (d, s) = (sae.config().d_in, sae.config().d_sae);
    let mut pre: Vec<(u32, f32)> = (0..s)
        .map(|j| {
            let mut acc = b_enc[j] as f64;
            for i in 0..d {
                acc += (x[i] - b_dec[i]) as f64 * w_enc[i * s + j] as f64;
            }
            (j as u32, acc as f32)
        })
        .collect();
    pre.sort_by(|a, b| b.1.total_cmp(&a.1));
    pre.into_iter().take(sae.config().k).filter(|&(_, a)| a > 0.0).collect()
}

fn naive_decode(sae: &Sae, f: &[(u32, f32)]) -> Vec<f32> {
    let [_, _, (_, w_dec, _), (_, b_dec, _)] = sae.tensors();
    let d = sae.config().d_in;
    (0..d)
        .map(|i| b_dec[i] + f.iter().map(|&(j, a)| a * w_dec[j as usize * d + i]).sum::<f32>())
        .collect()
}

#[test]
fn encode_and_decode_match_the_straightforward_definition() {
    let sae = random_sae(64, 256, 8, 3, 1);
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let x: Vec<f32> = (0..64 * 20).map(|_| rng.random::<f32>() * 4.0 - 2.0).collect();
    let encoded = sae.encode(&x);
    assert_eq!(encoded.len(), 20);
    for (row, features) in x.chunks_exact(64).zip(&encoded) {
        let expected = naive_encode(&sae, row);
        assert_eq!(
            features.iter().map(|f| f.0).collect::<Vec<_>>(),
            expected.iter().map(|f| f.0).collect::<Vec<_>>()
        );
        for (a, b) in features.iter().zip(&expected) {
            assert!((a.1 - b.1).abs() < 1e-4, "activation {} vs {}", a.1, b.1);
        }
        let (fast, slow) = (sae.decode(features), naive_decode(&sae, &expected));
        assert!(fast.iter().zip(&slow).all(|(a, b)| (a - b).abs() < 1e-4));
    }
    // The error term completes the reconstruction exactly.
    let (recon, error) = (sae.reconstruct(&x), sae.error(&x));
    assert!(x.iter().zip(recon.iter().zip(&error)).all(|(x, (r, e))| (r + e - x).abs() < 1e-5));
}

#[test]
fn top_k_keeps_only_positive_values_strongest_first() {
    assert_eq!(top_k_positive(&[0.5, -1.0, 2.0, 0.0, 1.0], 2), vec![(2, 2.0), (4, 1.0)]);
    assert_eq!(top_k_positive(&[-0.5, 0.3, -1.0], 3), vec![(1, 0.3)]);
    assert_eq!(top_k_positive(&[1.0, 1.0, 1.0], 2), vec![(0, 1.0), (1, 1.0)]);
}

#[test]
fn compact_and_saelens_files_load_back() {
    let sae = random_sae(D, 512, 16, 12, 3);
    let x: Vec<f32> = (0..D * 3).map(|i| (i as f32 * 0.01).sin()).collect();
    let f32_file = Sae::from_compact(&compact_bytes(&sae, false)).unwrap();
    assert_eq!(f32_file.config(), sae.config());
    assert_eq!(f32_file.encode(&x), sae.encode(&x));
    let f16_file = Sae::from_compact(&compact_bytes(&sae, true)).unwrap();
    let (a, b) = (f16_file.reconstruct(&x), sae.reconstruct(&x));
    let rel = a.iter().zip(&b).map(|(p, q)| (p - q).powi(2)).sum::<f32>() / b.iter().map(|q| q * q).sum::<f32>();
    assert!(rel < 1e-4, "f16 rounding changed the reconstruction by {rel}");
    let cfg = saelens_cfg(sae.config(), &Default::default()).to_string();
    assert!(cfg.contains("\"hook_name\":\"blocks.12.hook_resid_post\""));
    let saelens = Sae::from_saelens(&cfg, &compact_bytes(&sae, false)).unwrap();
    assert_eq!(saelens.config().layer, 12);
}

#[test]
fn bad_files_fail_with_clear_errors() {
    let sae = random_sae(D, 256, 8, 12, 4);
    let good = compact_bytes(&sae, true);
    // Truncated anywhere: an error, never a panic.
    for cut in [0, 4, 7, 100, good.len() / 2, good.len() - 1] {
        let err = Sae::from_compact(&good[..cut]).unwrap_err();
        assert!(matches!(err, SaeError::File(_)), "cut at {cut}: {err}");
    }
    // Wrong shape: a config that claims another width.
    let mut cfg = saelens_cfg(sae.config(), &Default::default());
    cfg["d_sae"] = 512.into();
    let err = Sae::from_saelens(&cfg.to_string(), &good).unwrap_err();
    assert!(err.to_string().contains("W_enc") && err.to_string().contains("[576, 512]"), "{err}");
    // Broken layer metadata.
    let mut cfg = saelens_cfg(sae.config(), &Default::default());
    cfg["metadata"]["hook_name"] = "blocks.x.hook_resid_post".into();
    let err = Sae::from_saelens(&cfg.to_string(), &good).unwrap_err();
    assert!(err.to_string().contains("hook_name"), "{err}");
    // An architecture the engine does not implement.
    let mut cfg = saelens_cfg(sae.config(), &Default::default());
    cfg["architecture"] = "jumprelu".into();
    assert!(
        Sae::from_saelens(&cfg.to_string(), &good)
            .unwrap_err()
            .to_string()
            .contains("jumprelu")
    );
    // Not JSON at all.
    assert!(matches!(Sae::from_saelens("{", &good), Err(SaeError::Config(_))));
    // NaN weights.
    let cfg = SaeConfig {
        d_in: 2,
        d_sae: 2,
        k: 1,
        layer: 0,
        model_sha256: None,
    };
    let err = Sae::new(cfg, vec![f32::NAN, 0.0, 0.0, 0.0], vec![0.0; 2], vec![0.0; 4], vec![0.0; 2]).unwrap_err();
    assert!(matches!(err, SaeError::NotFinite("W_enc")), "{err}");
}

#[test]
fn an_sae_for_another_layer_or_width_does_not_fit_the_model() {
    let model = model(Backend::Cpu);
    let config = model.llama.config();
    assert!(random_sae(D, 64, 4, 15, 5).check_model(config, None).is_ok());
    let err = random_sae(D, 64, 4, 30, 5).check_model(config, None).unwrap_err();
    assert!(
        err.to_string().contains("layer 30") && err.to_string().contains("30 blocks"),
        "{err}"
    );
    let err = random_sae(512, 64, 4, 15, 5).check_model(config, None).unwrap_err();
    assert!(err.to_string().contains("576"), "{err}");
    let mut sae_cfg = random_sae(D, 64, 4, 15, 5).config().clone();
    sae_cfg.model_sha256 = Some("0".repeat(64));
    let sae = Sae::new(sae_cfg, vec![0.0; D * 64], vec![0.0; 64], vec![0.0; 64 * D], vec![0.0; D]).unwrap();
    assert!(sae.check_model(config, Some(kindling_engine::SMOLLM2_SHA256)).is_err());
}

fn logits(hook: Option<&mut dyn ResidualHook>, tokens: &[u32]) -> Vec<f32> {
    let model = model(Backend::Cpu);
    let mut cache = model.llama.new_cache();
    let out = model.llama.forward(tokens, &mut cache, hook, Logits::All).unwrap().unwrap();
    kindling_engine::to_host(out).unwrap()
}

#[test]
fn splicing_reconstruction_plus_error_leaves_the_logits_unchanged() {
    let tokens = ids(&prompt("A")["ids"]);
    let sae = random_sae(D, 1024, 32, 15, 6);
    let clean = logits(None, &tokens);
    let mut splice = Splice::new(&sae, SpliceMode::ReconstructionPlusError);
    let spliced = logits(Some(&mut splice), &tokens);
    let max = clean.iter().zip(&spliced).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(max < 1e-2, "logits moved by {max}");
    // The reconstruction alone (of a random SAE) does change them: the test can fail.
    let mut recon_only = Splice::new(&sae, SpliceMode::Reconstruction).leaving(vec![true]);
    let changed = logits(Some(&mut recon_only), &tokens);
    assert!(clean.iter().zip(&changed).any(|(a, b)| (a - b).abs() > 0.5));
}

#[test]
fn feature_capture_reports_every_token_in_prefill_and_decode() {
    let model = model(Backend::Cpu);
    let sae = random_sae(D, 512, 8, 9, 7);
    let tokens = ids(&prompt("B")["ids"]);
    let mut capture2 = FeatureCapture::new(&sae);
    let mut cache = model.llama.new_cache();
    model.llama.forward(&tokens, &mut cache, Some(&mut capture2), Logits::Last).unwrap();
    model.llama.forward(&[42], &mut cache, Some(&mut capture2), Logits::Last).unwrap();
    assert_eq!(capture2.positions, (0..tokens.len() + 1).collect::<Vec<_>>());
    assert!(
        capture2
            .features
            .iter()
            .all(|f| f.len() <= 8 && f.windows(2).all(|w| w[0].1 >= w[1].1))
    );
    // The features match encoding the captured residual directly.
    let mut residual = kindling_engine::CaptureResidual::new(9);
    let mut cache = model.llama.new_cache();
    model.llama.forward(&tokens, &mut cache, Some(&mut residual), Logits::None).unwrap();
    assert_eq!(sae.encode(&residual.take()), capture2.features[..tokens.len()].to_vec());
}

/// Where the shipped SAE lives (`public/sae/`; `KINDLING_SAE_DIR` points elsewhere).
fn shipped_dir() -> std::path::PathBuf {
    std::env::var_os("KINDLING_SAE_DIR").map_or_else(|| crate::common::repo_root().join("public/sae"), std::path::PathBuf::from)
}

/// The committed SAE and its manifest.
fn shipped() -> (Sae, serde_json::Value) {
    let dir = shipped_dir();
    let bytes = std::fs::read(dir.join("kindling-sae.f16.safetensors")).expect("public/sae/kindling-sae.f16.safetensors");
    let manifest = serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    (Sae::from_compact(&bytes).unwrap(), manifest)
}

#[test]
fn the_shipped_sae_fits_the_model_and_its_saelens_export_agrees() {
    let (sae, manifest) = shipped();
    let model = model(Backend::Cpu);
    sae.check_model(model.llama.config(), Some(kindling_engine::SMOLLM2_SHA256))
        .unwrap();
    assert_eq!(manifest["config"]["hook_name"], sae.config().hook_name());
    let dir = shipped_dir();
    // The SAELens form is not committed: `kindling-build export-saelens` derives it.
    let compact = std::fs::read(dir.join("kindling-sae.f16.safetensors")).unwrap();
    let export = saelens_from_compact(&compact).unwrap();
    let saelens = Sae::from_saelens(&export.cfg_json, &export.weights).unwrap();
    assert_eq!(saelens.config(), sae.config());
    for ((name, a, _), (_, b, _)) in saelens.tensors().into_iter().zip(sae.tensors()) {
        assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "{name} differs");
    }
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&export.cfg_json).unwrap(),
        manifest["config"]
    );
    // The shipped atlas accepts an SAE loaded from the export (it records the export's sha256).
    let atlas: serde_json::Value =
        serde_json::from_slice(&std::fs::read(crate::common::repo_root().join("public/atlas/atlas.json")).unwrap()).unwrap();
    assert_eq!(atlas["sae"]["saelens_sha256"].as_str(), saelens.sha256());
    // Every committed file's sha256 is the one the manifest records.
    for file in manifest["files"].as_array().unwrap() {
        let bytes = std::fs::read(dir.join(file["file"].as_str().unwrap())).unwrap();
        use sha2::Digest;
        assert_eq!(
            format!("{:x}", sha2::Sha256::digest(&bytes)),
            file["sha256"].as_str().unwrap(),
            "{}",
            file["file"]
        );
    }
}

#[test]
fn the_shipped_sae_reconstructs_a_fixed_prompt_as_well_as_reported() {
    let (sae, manifest) = shipped();
    let model = model(Backend::Cpu);
    // A fixed prompt from the SAE's own distribution: the first held-out window of each chat
    // source (tests/fixtures/sae_heldout_windows.json), each run on its own as in evaluation.
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(crate::common::repo_root().join("tests/fixtures/sae_heldout_windows.json")).unwrap())
            .unwrap();
    let d = sae.config().d_in;
    let mut kept: Vec<f32> = Vec::new();
    for window in fixture["windows"].as_array().unwrap() {
        let tokens = ids(&window["tokens"]);
        let mut capture = kindling_engine::CaptureResidual::new(sae.config().layer);
        let mut cache = model.llama.new_cache();
        model.llama.forward(&tokens, &mut cache, Some(&mut capture), Logits::None).unwrap();
        let rows = capture.take();
        // As in training and evaluation: position 0 and control tokens are left out.
        for (p, row) in rows.chunks_exact(d).enumerate() {
            if p > 0 && !model.tokenizer.is_control(tokens[p]) {
                kept.extend_from_slice(row);
            }
        }
    }
    let n = kept.len() / d;
    let recon = sae.reconstruct(&kept);
    let mut mean = vec![0.0f64; d];
    kept.chunks_exact(d)
        .for_each(|r| mean.iter_mut().zip(r).for_each(|(m, &v)| *m += v as f64 / n as f64));
    let sse: f64 = kept.iter().zip(&recon).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let var: f64 = kept
        .chunks_exact(d)
        .map(|r| r.iter().zip(&mean).map(|(&a, m)| (a as f64 - m).powi(2)).sum::<f64>())
        .sum();
    let fvu = sse / var;
    let reported = manifest["metrics"]["fvu"].as_f64().unwrap();
    eprintln!("FVU on the fixed prompt ({n} tokens): {fvu:.4}; held out: {reported:.4}");
    assert!(
        (fvu - reported).abs() <= 0.25 * reported,
        "FVU {fvu:.4} on the fixed prompt vs {reported:.4} held out"
    );
    let l0 = sae.encode(&kept).iter().map(Vec::len).sum::<usize>() as f64 / n as f64;
    assert!(l0 >= 0.5 * sae.config().k as f64 && l0 <= sae.config().k as f64, "L0 {l0}");
}

/// Decode steps encode one row with the 8-bit encoder; it must pick (nearly) the latents the
/// f32 encoder picks, with nearly the same activations.
#[test]
fn the_8_bit_encoder_of_decode_steps_agrees_with_the_f32_one() {
    let (sae, _) = shipped();
    let model = model(Backend::Cpu);
    let tokens = model
        .tokenizer
        .encode_chat(&[kindling_engine::ChatMessage::user("Tell me a story about a dragon who loves tea.")])
        .unwrap();
    let mut capture = kindling_engine::CaptureResidual::new(sae.config().layer);
    model
        .llama
        .forward(&tokens, &mut model.llama.new_cache(), Some(&mut capture), Logits::None)
        .unwrap();
    let rows = capture.take();
    let d = sae.config().d_in;
    let batch = sae.encode(&rows[d..]); // many rows: f32
    let (mut shared, mut total, mut worst) = (0usize, 0usize, 0f32);
    for (row, full) in rows[d..].chunks_exact(d).zip(&batch) {
        let single = &sae.encode(row)[0]; // one row: 8-bit
        total += full.len();
        for &(j, a) in full {
            if let Some(&(_, b)) = single.iter().find(|(i, _)| *i == j) {
                shared += 1;
                worst = worst.max((a - b).abs() / a.abs().max(1.0));
            }
        }
    }
    let overlap = shared as f32 / total as f32;
    assert!(overlap >= 0.9, "only {:.1}% of the latents agree", overlap * 100.0);
    assert!(worst <= 0.05, "activations differ by up to {:.1}%", worst * 100.0);
}

/// The page's loader skips hashing the SAE again once its download matched the manifest: the
/// SAE it gets is the one `from_compact` gives, with the same identity.
#[test]
fn a_checked_sae_file_loads_like_a_hashed_one() {
    let (sae, manifest) = shipped();
    let bytes = std::fs::read(shipped_dir().join("kindling-sae.f16.safetensors")).unwrap();
    let listed = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["file"] == "kindling-sae.f16.safetensors");
    let sha = listed.and_then(|f| f["sha256"].as_str()).expect("the manifest lists the SAE file");
    let checked = Sae::from_compact_checked(&bytes, &sha.to_ascii_uppercase()).unwrap();
    assert_eq!(checked.sha256(), sae.sha256());
    assert_eq!(checked.config(), sae.config());
    for ((name, a, _), (_, b, _)) in checked.tensors().into_iter().zip(sae.tensors()) {
        assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "{name} differs");
    }
}
