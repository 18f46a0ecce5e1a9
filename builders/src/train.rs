//! TopK SAE training with sparse gradients.
//!
//! Model (in normalised units, `x ← s·x` with `s = √d_in / E‖x‖`, folded into the weights at
//! export):
//! ```text
//! pre  = (x − b_dec) · encᵀ + b_enc          dense: the one product paid per token (burn)
//! f    = TopK_k(ReLU(pre))                   k latents per token
//! x̂    = b_dec + Σ_j f_j · dec[j]            dec rows kept at unit norm
//! loss = ‖x − x̂‖² / ‖x − x̄‖²                 (FVU of the batch)
//!      + α · ‖e − ê_aux‖² / ‖x − x̄‖²         AuxK: ê_aux = Σ over the top-k_aux *dead* latents,
//!                                            e = x − x̂ held fixed (Gao et al. 2024)
//! ```
//! Only the `k` (+ `k_aux`) selected latents of a token receive gradient, so the backward
//! pass touches `k` rows of `enc` and `dec` per token instead of all `d_sae`: after the dense
//! encoder product everything is gathers and scatter-adds over the selected rows (host code,
//! parallel over latents). Adam updates all parameters (its moments decay everywhere); the
//! gradient's component along each decoder row is removed and rows are renormalised after
//! every step.

use std::path::Path;

use kindling_engine::burn::tensor::{Device, Tensor, TensorData};
use kindling_engine::sae::top_k_positive;
use kindling_engine::to_host;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use safetensors::tensor::TensorView;

use crate::BuildError;

#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub d_in: usize,
    pub d_sae: usize,
    pub k: usize,
    /// Dead latents used by the AuxK loss per token.
    pub k_aux: usize,
    pub aux_coef: f32,
    pub lr: f32,
    pub batch: usize,
    /// A latent that has not fired for this many tokens counts as dead.
    pub dead_after_tokens: u64,
    pub seed: u64,
}

/// Parameters and optimiser state.
pub struct Trainer {
    pub cfg: TrainConfig,
    /// `[d_sae, d_in]`, a latent's encoder direction per row.
    pub enc: Vec<f32>,
    pub b_enc: Vec<f32>,
    /// `[d_sae, d_in]`, unit-norm rows.
    pub dec: Vec<f32>,
    pub b_dec: Vec<f32>,
    adam: [Adam; 4],
    /// Tokens since each latent last fired.
    pub since_fired: Vec<u64>,
    pub step: u64,
    device: Device,
}

/// Statistics of one step.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepStats {
    pub fvu: f32,
    pub aux_loss: f32,
    /// Mean number of active latents per token.
    pub l0: f32,
    pub dead_fraction: f32,
}

#[derive(Clone)]
struct Adam {
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Adam {
    fn new(n: usize) -> Self {
        Self {
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    fn update(&mut self, params: &mut [f32], grads: &[f32], lr: f32, t: u64) {
        const B1: f32 = 0.9;
        const B2: f32 = 0.999;
        const EPS: f32 = 1e-8;
        let c1 = 1.0 - B1.powi(t as i32);
        let c2 = 1.0 - B2.powi(t as i32);
        params
            .par_chunks_mut(4096)
            .zip(grads.par_chunks(4096))
            .zip(self.m.par_chunks_mut(4096).zip(self.v.par_chunks_mut(4096)))
            .for_each(|((p, g), (m, v))| {
                for i in 0..p.len() {
                    m[i] = B1 * m[i] + (1.0 - B1) * g[i];
                    v[i] = B2 * v[i] + (1.0 - B2) * g[i] * g[i];
                    p[i] -= lr * (m[i] / c1) / ((v[i] / c2).sqrt() + EPS);
                }
            });
    }
}

/// Geometric median of `rows` (Weiszfeld iterations), the decoder bias's starting point.
pub fn geometric_median(rows: &[f32], d: usize, iterations: usize) -> Vec<f32> {
    let n = rows.len() / d;
    let mut m = vec![0.0f32; d];
    for r in rows.chunks_exact(d) {
        m.iter_mut().zip(r).for_each(|(a, b)| *a += b / n as f32);
    }
    for _ in 0..iterations {
        let mut num = vec![0.0f64; d];
        let mut den = 0.0f64;
        for r in rows.chunks_exact(d) {
            let dist = r.iter().zip(&m).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt().max(1e-6) as f64;
            num.iter_mut().zip(r).for_each(|(a, &b)| *a += b as f64 / dist);
            den += 1.0 / dist;
        }
        m = num.iter().map(|a| (a / den) as f32).collect();
    }
    m
}

fn normalise_rows(w: &mut [f32], d: usize) {
    w.par_chunks_mut(d).for_each(|r| {
        let norm = r.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        r.iter_mut().for_each(|x| *x /= norm);
    });
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The gradient that one selected latent of one token contributes.
struct LatentGrad {
    latent: u32,
    token: u32,
    /// d loss / d pre-activation (= d loss / d activation, the latent being active).
    d_pre: f32,
    act: f32,
    /// d loss / d output = `out_scale ×` the token's error (main) or AuxK error.
    out_scale: f32,
    aux: bool,
}

/// The selected latents of one token: (latent, activation), for the main and AuxK paths.
struct Selection {
    main: Vec<(u32, f32)>,
    aux: Vec<(u32, f32)>,
}

impl Trainer {
    /// A fresh SAE: random unit decoder rows, the encoder tied to them, `b_dec` at the
    /// geometric median of `sample` (normalised rows).
    pub fn new(cfg: TrainConfig, sample: &[f32], device: Device) -> Self {
        let (d, s) = (cfg.d_in, cfg.d_sae);
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let mut dec: Vec<f32> = (0..s * d)
            .map(|_| {
                // Box–Muller: a Gaussian direction, uniform on the sphere once normalised.
                let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-12), rng.random());
                (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
            })
            .collect();
        normalise_rows(&mut dec, d);
        let enc = dec.clone();
        let b_dec = geometric_median(sample, d, 20);
        let adam = [Adam::new(s * d), Adam::new(s), Adam::new(s * d), Adam::new(d)];
        Self {
            enc,
            b_enc: vec![0.0; s],
            dec,
            b_dec,
            adam,
            since_fired: vec![0; s],
            step: 0,
            device,
            cfg,
        }
    }

    /// `(x − b_dec) · encᵀ + b_enc`, `[rows, d_sae]`, computed with burn on the trainer's device.
    fn pre_activations(&self, centred: &[f32], rows: usize) -> Result<Vec<f32>, BuildError> {
        let (d, s) = (self.cfg.d_in, self.cfg.d_sae);
        let x = Tensor::<2>::from_data(TensorData::new(centred.to_vec(), [rows, d]), &self.device);
        let enc = Tensor::<2>::from_data(TensorData::new(self.enc.clone(), [s, d]), &self.device);
        let b_enc = Tensor::<2>::from_data(TensorData::new(self.b_enc.clone(), [1, s]), &self.device);
        Ok(to_host(x.matmul(enc.transpose()) + b_enc)?)
    }

    /// One optimisation step on `x` (`[rows, d_in]`, normalised). `lr_scale` multiplies the
    /// learning rate (schedules).
    pub fn step(&mut self, x: &[f32], lr_scale: f32) -> Result<StepStats, BuildError> {
        let (d, s, k) = (self.cfg.d_in, self.cfg.d_sae, self.cfg.k);
        let rows = x.len() / d;
        let centred: Vec<f32> = x
            .par_chunks(d)
            .flat_map_iter(|r| r.iter().zip(&self.b_dec).map(|(a, b)| a - b))
            .collect();
        let pre = self.pre_activations(&centred, rows)?;
        let dead: Vec<bool> = self.since_fired.iter().map(|&t| t >= self.cfg.dead_after_tokens).collect();
        let n_dead = dead.iter().filter(|&&x| x).count();
        let k_aux = if n_dead > 0 { self.cfg.k_aux.min(n_dead) } else { 0 };
        let selections: Vec<Selection> = pre
            .par_chunks(s)
            .map(|row| {
                let main = top_k_positive(row, k);
                let aux = if k_aux > 0 {
                    let masked: Vec<f32> = row
                        .iter()
                        .zip(&dead)
                        .map(|(&p, &dd)| if dd { p } else { f32::NEG_INFINITY })
                        .collect();
                    top_k_positive(&masked, k_aux)
                } else {
                    Vec::new()
                };
                Selection { main, aux }
            })
            .collect();

        // Reconstructions, errors and the batch variance (the FVU denominator).
        let mut mean = vec![0.0f32; d];
        for r in x.chunks_exact(d) {
            mean.iter_mut().zip(r).for_each(|(m, v)| *m += v / rows as f32);
        }
        let variance: f32 = x
            .par_chunks(d)
            .map(|r| r.iter().zip(&mean).map(|(a, b)| (a - b) * (a - b)).sum::<f32>())
            .sum::<f32>()
            .max(1e-12);
        // Per token: error e = x − x̂ and AuxK error e_aux = ê_aux − e.
        let (errors, aux_errors): (Vec<Vec<f32>>, Vec<Vec<f32>>) = x
            .par_chunks(d)
            .zip(&selections)
            .map(|(xr, sel)| {
                let mut recon = self.b_dec.clone();
                for &(j, a) in &sel.main {
                    recon
                        .iter_mut()
                        .zip(&self.dec[j as usize * d..(j as usize + 1) * d])
                        .for_each(|(r, w)| *r += a * w);
                }
                let e: Vec<f32> = xr.iter().zip(&recon).map(|(a, b)| a - b).collect();
                let aux_e = if sel.aux.is_empty() {
                    Vec::new()
                } else {
                    let mut ea = vec![0.0f32; d];
                    for &(j, a) in &sel.aux {
                        ea.iter_mut()
                            .zip(&self.dec[j as usize * d..(j as usize + 1) * d])
                            .for_each(|(r, w)| *r += a * w);
                    }
                    ea.iter_mut().zip(&e).for_each(|(a, b)| *a -= b);
                    ea
                };
                (e, aux_e)
            })
            .unzip();
        let sse: f32 = errors.par_iter().map(|e| e.iter().map(|v| v * v).sum::<f32>()).sum();
        let aux_sse: f32 = aux_errors.par_iter().map(|e| e.iter().map(|v| v * v).sum::<f32>()).sum();
        let fvu = sse / variance;
        let aux_loss = self.cfg.aux_coef * aux_sse / variance;

        // d loss / d x̂ = −2e/var; d loss / d ê_aux = 2α·e_aux/var. For each selected latent:
        // d/d a = grad_out · dec[j]; d/d dec[j] = a · grad_out; d/d pre = d/d a (a > 0).
        let g_main = -2.0 / variance;
        let g_aux = 2.0 * self.cfg.aux_coef / variance;
        let per_token: Vec<Vec<LatentGrad>> = selections
            .par_iter()
            .enumerate()
            .map(|(t, sel)| {
                let main = sel.main.iter().map(|&(j, a)| (j, a, false));
                let aux = sel.aux.iter().map(|&(j, a)| (j, a, true));
                main.chain(aux)
                    .map(|(latent, act, aux)| {
                        let (out, out_scale) = if aux { (&aux_errors[t], g_aux) } else { (&errors[t], g_main) };
                        let w = &self.dec[latent as usize * d..(latent as usize + 1) * d];
                        LatentGrad {
                            latent,
                            token: t as u32,
                            d_pre: out_scale * dot(out, w),
                            act,
                            out_scale,
                            aux,
                        }
                    })
                    .collect()
            })
            .collect();
        let mut entries: Vec<LatentGrad> = per_token.into_iter().flatten().collect();
        entries.par_sort_unstable_by_key(|e| (e.latent, e.token));

        // Scatter-add per latent (each latent's rows are written by one task).
        let mut grad_enc = vec![0.0f32; s * d];
        let mut grad_dec = vec![0.0f32; s * d];
        let mut grad_b_enc = vec![0.0f32; s];
        let groups: Vec<&[LatentGrad]> = entries.chunk_by(|a, b| a.latent == b.latent).collect();
        let touched: Vec<(u32, Vec<f32>, Vec<f32>, f32)> = groups
            .par_iter()
            .map(|group| {
                let j = group[0].latent;
                let mut ge = vec![0.0f32; d];
                let mut gd = vec![0.0f32; d];
                let mut gb = 0.0f32;
                for e in group.iter() {
                    let t = e.token as usize;
                    let xc = &centred[t * d..(t + 1) * d];
                    ge.iter_mut().zip(xc).for_each(|(g, v)| *g += e.d_pre * v);
                    gb += e.d_pre;
                    let out = if e.aux { &aux_errors[t] } else { &errors[t] };
                    gd.iter_mut().zip(out).for_each(|(g, v)| *g += e.act * e.out_scale * v);
                }
                // Keep decoder rows on the unit sphere: drop the radial gradient component.
                let w = &self.dec[j as usize * d..(j as usize + 1) * d];
                let radial = dot(&gd, w);
                gd.iter_mut().zip(w).for_each(|(g, v)| *g -= radial * v);
                (j, ge, gd, gb)
            })
            .collect();
        // b_dec: through the output (Σ_t d/dx̂) and through the encoder input (−Σ d/dpre · enc[j]).
        let mut grad_b_dec = vec![0.0f32; d];
        for e in &errors {
            grad_b_dec.iter_mut().zip(e).for_each(|(g, v)| *g += g_main * v);
        }
        for e in &entries {
            let row = &self.enc[e.latent as usize * d..(e.latent as usize + 1) * d];
            grad_b_dec.iter_mut().zip(row).for_each(|(g, v)| *g -= e.d_pre * v);
        }
        for (j, ge, gd, gb) in touched {
            let j = j as usize;
            grad_enc[j * d..(j + 1) * d].copy_from_slice(&ge);
            grad_dec[j * d..(j + 1) * d].copy_from_slice(&gd);
            grad_b_enc[j] = gb;
        }

        self.step += 1;
        let lr = self.cfg.lr * lr_scale;
        let t = self.step;
        let [a_enc, a_benc, a_dec, a_bdec] = &mut self.adam;
        a_enc.update(&mut self.enc, &grad_enc, lr, t);
        a_benc.update(&mut self.b_enc, &grad_b_enc, lr, t);
        a_dec.update(&mut self.dec, &grad_dec, lr, t);
        a_bdec.update(&mut self.b_dec, &grad_b_dec, lr, t);
        normalise_rows(&mut self.dec, d);

        // Dead-latent bookkeeping.
        let mut fired = vec![false; s];
        let mut active = 0usize;
        for sel in &selections {
            active += sel.main.len();
            sel.main.iter().for_each(|&(j, _)| fired[j as usize] = true);
        }
        for (since, f) in self.since_fired.iter_mut().zip(&fired) {
            *since = if *f { 0 } else { *since + rows as u64 };
        }
        let dead_fraction = self.since_fired.iter().filter(|&&t| t >= self.cfg.dead_after_tokens).count() as f32 / s as f32;
        Ok(StepStats {
            fvu,
            aux_loss,
            l0: active as f32 / rows as f32,
            dead_fraction,
        })
    }

    /// Saves parameters, optimiser state and counters (atomically: a cut-off run keeps the
    /// previous checkpoint).
    pub fn save(&self, path: &Path, extra: &serde_json::Value) -> Result<(), BuildError> {
        let since: Vec<f32> = self.since_fired.iter().map(|&t| t as f32).collect();
        let named: Vec<(&str, &[f32])> = vec![
            ("enc", &self.enc),
            ("b_enc", &self.b_enc),
            ("dec", &self.dec),
            ("b_dec", &self.b_dec),
            ("adam.enc.m", &self.adam[0].m),
            ("adam.enc.v", &self.adam[0].v),
            ("adam.b_enc.m", &self.adam[1].m),
            ("adam.b_enc.v", &self.adam[1].v),
            ("adam.dec.m", &self.adam[2].m),
            ("adam.dec.v", &self.adam[2].v),
            ("adam.b_dec.m", &self.adam[3].m),
            ("adam.b_dec.v", &self.adam[3].v),
            ("since_fired", &since),
        ];
        let bytes: Vec<(String, Vec<u8>, usize)> = named
            .iter()
            .map(|(n, v)| (n.to_string(), v.iter().flat_map(|x| x.to_le_bytes()).collect(), v.len()))
            .collect();
        let views = bytes
            .iter()
            .map(|(n, b, len)| Ok((n.clone(), TensorView::new(safetensors::Dtype::F32, vec![*len], b)?)))
            .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
            .map_err(|e| BuildError::Input(format!("checkpoint: {e}")))?;
        let mut meta = std::collections::HashMap::new();
        meta.insert("step".to_string(), self.step.to_string());
        meta.insert("config".to_string(), format!("{:?}", self.cfg));
        meta.insert("extra".to_string(), extra.to_string());
        let data = safetensors::serialize(views, Some(meta)).map_err(|e| BuildError::Input(format!("checkpoint: {e}")))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, data).map_err(|e| BuildError::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| BuildError::io(path, e))
    }

    /// Restores a checkpoint written by [`save`](Self::save) with the same config; returns
    /// its `extra` JSON.
    pub fn load(&mut self, path: &Path) -> Result<serde_json::Value, BuildError> {
        let bytes = std::fs::read(path).map_err(|e| BuildError::io(path, e))?;
        let bad = |what: String| BuildError::Input(format!("checkpoint {}: {what}", path.display()));
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        if meta.get("config") != Some(&format!("{:?}", self.cfg)) {
            return Err(bad("it was made with another training config".into()));
        }
        let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let read = |name: &str, len: usize| -> Result<Vec<f32>, BuildError> {
            let t = file.tensor(name).map_err(|_| bad(format!("{name} is missing")))?;
            if t.shape() != [len] {
                return Err(bad(format!("{name} has shape {:?}", t.shape())));
            }
            Ok(t.data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect())
        };
        let (sd, s, d) = (self.cfg.d_sae * self.cfg.d_in, self.cfg.d_sae, self.cfg.d_in);
        self.enc = read("enc", sd)?;
        self.b_enc = read("b_enc", s)?;
        self.dec = read("dec", sd)?;
        self.b_dec = read("b_dec", d)?;
        for (i, (name, len)) in [("enc", sd), ("b_enc", s), ("dec", sd), ("b_dec", d)].into_iter().enumerate() {
            self.adam[i].m = read(&format!("adam.{name}.m"), len)?;
            self.adam[i].v = read(&format!("adam.{name}.v"), len)?;
        }
        self.since_fired = read("since_fired", s)?.into_iter().map(|t| t as u64).collect();
        self.step = meta.get("step").and_then(|s| s.parse().ok()).ok_or_else(|| bad("no step".into()))?;
        serde_json::from_str(meta.get("extra").map_or("null", String::as_str)).map_err(|e| bad(e.to_string()))
    }
}

impl Trainer {
    /// The trained SAE on raw residual units: the input scale `s` is folded in
    /// (`W_enc ← s·encᵀ`, `b_dec ← b_dec/s`, `W_dec ← dec/s`), so activations are unchanged.
    pub fn to_sae(&self, scale: f32, layer: usize, model_sha256: Option<String>) -> Result<kindling_engine::Sae, BuildError> {
        let (d, s) = (self.cfg.d_in, self.cfg.d_sae);
        let mut w_enc = vec![0.0f32; d * s];
        for j in 0..s {
            for i in 0..d {
                w_enc[i * s + j] = self.enc[j * d + i] * scale;
            }
        }
        let cfg = kindling_engine::SaeConfig {
            d_in: d,
            d_sae: s,
            k: self.cfg.k,
            layer,
            model_sha256,
        };
        let w_dec = self.dec.iter().map(|w| w / scale).collect();
        let b_dec = self.b_dec.iter().map(|b| b / scale).collect();
        Ok(kindling_engine::Sae::new(cfg, w_enc, self.b_enc.clone(), w_dec, b_dec)?)
    }
}

/// `kindling-build train`: trains on one layer of a harvest, checkpointing as it goes.
pub struct TrainArgs {
    pub harvest: std::path::PathBuf,
    pub layer: usize,
    pub out: std::path::PathBuf,
    pub cfg: TrainConfig,
    pub epochs: f64,
    pub backend: kindling_engine::Backend,
    pub checkpoint_every_s: u64,
    pub command: String,
}

/// All training rows of one harvested layer, kept as f16.
pub struct Rows {
    pub data: Vec<half::f16>,
    pub d: usize,
}

impl Rows {
    pub fn load(harvest: &Path, layer: usize) -> Result<(Self, serde_json::Value), BuildError> {
        let state_path = harvest.join("harvest.json");
        let text = std::fs::read_to_string(&state_path).map_err(|e| BuildError::io(&state_path, e))?;
        let state: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| BuildError::Input(format!("{}: {e}", state_path.display())))?;
        let d = state["config"]["d_in"]
            .as_u64()
            .ok_or_else(|| BuildError::Input("harvest.json has no d_in".into()))? as usize;
        if !state["config"]["layers"]
            .as_array()
            .is_some_and(|l| l.iter().any(|x| x.as_u64() == Some(layer as u64)))
        {
            return Err(BuildError::Input(format!(
                "the harvest in {} has no layer {layer}",
                harvest.display()
            )));
        }
        let mut data = Vec::new();
        for shard in state["shards"].as_array().into_iter().flatten() {
            let path = harvest.join(format!("layer-{layer}")).join(shard["file"].as_str().unwrap_or(""));
            let bytes = std::fs::read(&path).map_err(|e| BuildError::io(&path, e))?;
            data.extend(bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]])));
        }
        if data.is_empty() {
            return Err(BuildError::Input(format!("the harvest in {} has no rows yet", harvest.display())));
        }
        Ok((Self { data, d }, state))
    }

    pub fn len(&self) -> usize {
        self.data.len() / self.d
    }

    /// Rows `indices`, multiplied by `scale`, as f32.
    pub fn gather(&self, indices: &[u32], scale: f32) -> Vec<f32> {
        let d = self.d;
        let mut out = vec![0.0f32; indices.len() * d];
        out.par_chunks_mut(d).zip(indices).for_each(|(o, &i)| {
            let row = &self.data[i as usize * d..(i as usize + 1) * d];
            o.iter_mut().zip(row).for_each(|(o, v)| *o = v.to_f32() * scale);
        });
        out
    }

    /// `√d / E‖x‖` over (up to) the first 65,536 rows: makes the mean input norm `√d`
    /// (SAELens `expected_average_only_in`).
    pub fn norm_scale(&self) -> f32 {
        let n = self.len().min(65_536);
        let rows = self.gather(&(0..n as u32).collect::<Vec<_>>(), 1.0);
        let mean_norm = rows.chunks_exact(self.d).map(|r| dot(r, r).sqrt() as f64).sum::<f64>() / n as f64;
        (self.d as f64).sqrt() as f32 / mean_norm as f32
    }
}

/// Which rows each training step visits: every epoch is its own seeded permutation, so a
/// resumed run sees exactly the data an uninterrupted one would.
struct BatchOrder {
    n: usize,
    batch: usize,
    seed: u64,
    epoch: Option<(u64, Vec<u32>)>,
}

impl BatchOrder {
    fn new(n: usize, batch: usize, seed: u64) -> Self {
        Self {
            n,
            batch: batch.min(n),
            seed,
            epoch: None,
        }
    }

    fn indices(&mut self, step: u64) -> &[u32] {
        use rand::seq::SliceRandom;
        let per_epoch = (self.n / self.batch).max(1) as u64;
        let (epoch, within) = (step / per_epoch, (step % per_epoch) as usize);
        if self.epoch.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut order: Vec<u32> = (0..self.n as u32).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(self.seed.wrapping_add(epoch)));
            self.epoch = Some((epoch, order));
        }
        let order = &self.epoch.as_ref().expect("set above").1;
        &order[within * self.batch..(within + 1) * self.batch]
    }
}

pub fn run(args: &TrainArgs) -> Result<(), BuildError> {
    let started = std::time::Instant::now();
    let (rows, harvest) = Rows::load(&args.harvest, args.layer)?;
    // The SAE's width is the harvest's.
    let cfg = TrainConfig {
        d_in: rows.d,
        ..args.cfg.clone()
    };
    let n = rows.len();
    let scale = rows.norm_scale();
    let total_steps = ((n as f64 * args.epochs) / cfg.batch as f64).ceil() as u64;
    eprintln!(
        "[train] layer {}: {n} rows ({:.1} s to load), input scale {scale:.5}, {total_steps} steps of {} ({} epochs)",
        args.layer,
        started.elapsed().as_secs_f64(),
        cfg.batch,
        args.epochs
    );
    std::fs::create_dir_all(&args.out).map_err(|e| BuildError::io(&args.out, e))?;
    let device = args.backend.device()?;
    let sample = rows.gather(BatchOrder::new(n, 16_384, cfg.seed ^ 0xb1a5).indices(0), scale);
    let mut order = BatchOrder::new(n, cfg.batch, cfg.seed);
    let mut trainer = Trainer::new(cfg.clone(), &sample, device);
    let checkpoint = args.out.join("checkpoint.safetensors");
    if checkpoint.exists() {
        trainer.load(&checkpoint)?;
        eprintln!("[train] resumed from {} at step {}", checkpoint.display(), trainer.step);
    }
    let mut progress = crate::progress::Progress::new("train", "steps", total_steps, trainer.step);
    let mut last_checkpoint = std::time::Instant::now();
    let (mut fvu_avg, mut l0_avg, mut aux_avg) = (f32::NAN, 0.0f32, 0.0f32);
    let mut last = StepStats::default();
    while trainer.step < total_steps {
        let step = trainer.step;
        // Constant rate, then a linear decay to zero over the last 20% of steps.
        let decay_from = (total_steps as f64 * 0.8) as u64;
        let lr_scale = if step < decay_from {
            1.0
        } else {
            (total_steps - step) as f32 / (total_steps - decay_from).max(1) as f32
        };
        let x = rows.gather(order.indices(step), scale);
        last = trainer.step(&x, lr_scale)?;
        fvu_avg = if fvu_avg.is_nan() {
            last.fvu
        } else {
            0.95 * fvu_avg + 0.05 * last.fvu
        };
        l0_avg = if step == 0 { last.l0 } else { 0.95 * l0_avg + 0.05 * last.l0 };
        aux_avg = 0.95 * aux_avg + 0.05 * last.aux_loss;
        let extra = format!(
            "FVU {fvu_avg:.4} · L0 {l0_avg:.1} · dead {:.1}% · aux {aux_avg:.4}",
            100.0 * last.dead_fraction
        );
        progress.update(trainer.step, &extra, trainer.step == total_steps);
        if last_checkpoint.elapsed().as_secs() >= args.checkpoint_every_s || trainer.step == total_steps {
            trainer.save(&checkpoint, &serde_json::json!({ "scale": scale }))?;
            last_checkpoint = std::time::Instant::now();
        }
    }
    let model_sha = harvest["config"]["model_sha256"].as_str().map(str::to_string);
    let sae = trainer.to_sae(scale, args.layer, model_sha)?;
    let summary = serde_json::json!({
        "layer": args.layer,
        "rows": n,
        "epochs": args.epochs,
        "steps": total_steps,
        "input_scale": scale,
        "config": {
            "d_in": cfg.d_in, "d_sae": cfg.d_sae, "k": cfg.k, "k_aux": cfg.k_aux,
            "aux_coef": cfg.aux_coef, "lr": cfg.lr, "batch": cfg.batch,
            "dead_after_tokens": cfg.dead_after_tokens, "seed": cfg.seed,
            "optimizer": "Adam(0.9, 0.999, eps 1e-8); constant lr, linear decay over the last 20%",
            "init": "random unit decoder rows, encoder tied (enc = dec), b_dec at the geometric median of 16,384 rows",
        },
        "final_train_batch": { "fvu_ema": fvu_avg, "l0_ema": l0_avg, "dead_fraction": last.dead_fraction },
        "harvest_window": harvest["config"]["window"],
        "harvest_command": harvest["created_by"],
        "harvest": { "dir": args.harvest.display().to_string(), "corpus_manifest_sha256": harvest["config"]["corpus_manifest_sha256"], "source_rows": harvest["source_rows"] },
        "seconds_this_run": started.elapsed().as_secs_f64().round(),
        "created_by": args.command,
    });
    crate::export::write_trained(&args.out, &sae, &summary)?;
    eprintln!("[train] wrote {} ({:.0} s)", args.out.display(), started.elapsed().as_secs_f64());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        dot(a, b) / (dot(a, a).sqrt() * dot(b, b).sqrt()).max(1e-12)
    }

    /// Data made of a few planted unit directions, 3 active per sample: the SAE must find
    /// every planted direction as a decoder row (cosine ≥ 0.9).
    #[test]
    fn recovers_planted_sparse_directions() {
        let (d, n_true, active) = (32, 24, 3);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut truth: Vec<f32> = (0..n_true * d).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
        normalise_rows(&mut truth, d);
        let sample = |rng: &mut ChaCha8Rng, rows: usize| -> Vec<f32> {
            let mut x = vec![0.0f32; rows * d];
            for r in x.chunks_exact_mut(d) {
                for _ in 0..active {
                    let j = rng.random_range(0..n_true);
                    let a = 1.0 + rng.random::<f32>();
                    r.iter_mut().zip(&truth[j * d..(j + 1) * d]).for_each(|(x, t)| *x += a * t);
                }
            }
            x
        };
        let cfg = TrainConfig {
            d_in: d,
            d_sae: 48,
            k: active,
            k_aux: 16,
            aux_coef: 1.0 / 32.0,
            lr: 1e-2,
            batch: 256,
            dead_after_tokens: 2048,
            seed: 1,
        };
        let device = kindling_engine::Backend::Cpu.device().unwrap();
        let mut trainer = Trainer::new(cfg.clone(), &sample(&mut rng, 1024), device);
        let mut last = StepStats::default();
        for step in 0..1500 {
            let lr_scale = if step > 1200 { 0.2 } else { 1.0 };
            last = trainer.step(&sample(&mut rng, cfg.batch), lr_scale).unwrap();
        }
        assert!(last.fvu < 0.1, "FVU {}", last.fvu);
        for j in 0..n_true {
            let t = &truth[j * d..(j + 1) * d];
            let best = trainer.dec.chunks_exact(d).map(|w| cosine(w, t)).fold(f32::MIN, f32::max);
            assert!(best >= 0.9, "planted direction {j}: best decoder cosine {best:.3}");
        }
    }

    #[test]
    fn checkpoints_round_trip() {
        let cfg = TrainConfig {
            d_in: 8,
            d_sae: 16,
            k: 2,
            k_aux: 4,
            aux_coef: 0.03,
            lr: 1e-3,
            batch: 8,
            dead_after_tokens: 16,
            seed: 3,
        };
        let device = kindling_engine::Backend::Cpu.device().unwrap();
        let x: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut a = Trainer::new(cfg.clone(), &x, device.clone());
        a.step(&x, 1.0).unwrap();
        let dir = std::env::temp_dir().join(format!("kindling-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.safetensors");
        a.save(&path, &serde_json::json!({"epoch": 1})).unwrap();
        let mut b = Trainer::new(cfg.clone(), &x, device.clone());
        assert_eq!(b.load(&path).unwrap()["epoch"], 1);
        // Both continue identically.
        let (sa, sb) = (a.step(&x, 1.0).unwrap(), b.step(&x, 1.0).unwrap());
        assert_eq!(sa.fvu, sb.fvu);
        assert_eq!(a.dec, b.dec);
        let mut other = Trainer::new(TrainConfig { k: 3, ..cfg }, &x, device);
        assert!(other.load(&path).is_err(), "a checkpoint of another config must be refused");
        std::fs::remove_dir_all(dir).ok();
    }
}
