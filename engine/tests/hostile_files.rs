//! Hostile files: thousands of mutated copies of the shipped GGUF, SAE and atlas files must each
//! load or fail with an error: never panic, never allocate without bound.
//!
//! The mutations are deterministic (fixed seeds) and aimed at what a loader trusts: counts,
//! lengths, dims, types and offsets in the GGUF header, metadata and tensor table (set to 0, 1,
//! 2^32, 2^40, 2^63, u64::MAX, off by one, doubled, halved…), metadata values retyped as u64 or
//! removed, tensor shapes swapped or resized; for safetensors the header JSON (dtype, shape,
//! data_offsets, the config in the metadata) and the header length; random byte flips and
//! truncations everywhere. A file that loads is then used (a forward pass, an encode, a search)
//! so that a bad shape accepted at load time cannot panic later either.
//!
//! This binary counts every allocation (a `#[global_allocator]`): each case's peak growth in
//! live bytes must stay under its bound, and any single allocation over the bound is refused,
//! which aborts the run with the case number. The tests take one lock so that the counts of
//! one are not mixed with another's.

#[path = "integration/common.rs"]
mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use kindling_engine::{Atlas, Backend, Logits, Model, Sae, StaticEmbedder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// Allocation accounting

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);
/// Allocations larger than this are refused (the process then aborts with the case number).
static LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);
static CASE: AtomicU64 = AtomicU64::new(0);

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn grew(by: usize, size: usize) {
    let now = LIVE.fetch_add(by, Relaxed) + by;
    PEAK.fetch_max(now, Relaxed);
    LARGEST.fetch_max(size, Relaxed);
}

/// Whether an allocation of `size` bytes is allowed; reports the case when it is not, without
/// allocating.
fn admit(size: usize) -> bool {
    let limit = LIMIT.load(Relaxed);
    if size <= limit {
        return true;
    }
    let mut buf = [0u8; 160];
    let mut n = 0;
    let mut put = |s: &[u8]| {
        let k = s.len().min(buf.len() - n);
        buf[n..n + k].copy_from_slice(&s[..k]);
        n += k;
    };
    let num = |mut v: u64| {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        (digits, i)
    };
    put(b"\nhostile_files: case ");
    let (d, i) = num(CASE.load(Relaxed));
    put(&d[i..]);
    put(b" asked for one allocation of ");
    let (d, i) = num(size as u64);
    put(&d[i..]);
    put(b" bytes, over the bound of ");
    let (d, i) = num(limit as u64);
    put(&d[i..]);
    put(b"\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr(), &buf[..n]);
    false
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !admit(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded unchanged.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size(), layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !admit(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded unchanged.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size(), layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !admit(new_size) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded unchanged.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size(), new_size);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Relaxed);
            }
        }
        p
    }
}

const MB: usize = 1 << 20;

/// One test at a time: the counters are global.
static SERIAL: Mutex<()> = Mutex::new(());

/// Counts of one test's cases.
#[derive(Default, Debug)]
struct Stats {
    cases: usize,
    ok: usize,
    err: usize,
    peak_growth: usize,
    largest_alloc: usize,
}

impl Stats {
    fn report(&self, name: &str, bound: usize, started: std::time::Instant) {
        eprintln!(
            "{name}: {} cases ({} loaded, {} refused) in {:.1} s; peak growth {:.1} MB, largest allocation {:.1} MB, bound {} MB",
            self.cases,
            self.ok,
            self.err,
            started.elapsed().as_secs_f64(),
            self.peak_growth as f64 / MB as f64,
            self.largest_alloc as f64 / MB as f64,
            bound / MB
        );
    }
}

/// Runs one case: `f` must return (Ok or Err) without panicking, and allocate at most `bound`
/// bytes above what was live when it started (and no single allocation above it).
fn case<T, E: std::fmt::Display>(stats: &mut Stats, what: &dyn Fn() -> String, bound: usize, f: impl FnOnce() -> Result<T, E>) {
    CASE.fetch_add(1, Relaxed);
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);
    LARGEST.store(0, Relaxed);
    LIMIT.store(bound, Relaxed);
    let result = catch_unwind(AssertUnwindSafe(|| f().map(drop).map_err(|e| e.to_string().len())));
    LIMIT.store(usize::MAX, Relaxed);
    let growth = PEAK.load(Relaxed).saturating_sub(base);
    let largest = LARGEST.load(Relaxed);
    match result {
        Ok(Ok(())) => stats.ok += 1,
        Ok(Err(_)) => stats.err += 1,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("case {} ({}) panicked: {msg}", CASE.load(Relaxed), what());
        }
    }
    assert!(
        growth <= bound,
        "case {} ({}) allocated {:.1} MB above its baseline (bound {} MB)",
        CASE.load(Relaxed),
        what(),
        growth as f64 / MB as f64,
        bound / MB
    );
    stats.cases += 1;
    stats.peak_growth = stats.peak_growth.max(growth);
    stats.largest_alloc = stats.largest_alloc.max(largest);
}

fn read(rel: &str) -> Vec<u8> {
    let path = common::repo_root().join(rel);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (run scripts/fetch-model.sh)", path.display()))
}

/// Interesting replacements for an integer field of `width` bytes holding `old`.
fn interesting(rng: &mut ChaCha8Rng, old: u64, width: usize) -> u64 {
    let v = match rng.random_range(0..22) {
        0 => 0,
        1 => 1,
        2 => 2,
        3 => 3,
        4 => 31,
        5 => 33,
        6 => old.wrapping_add(1),
        7 => old.wrapping_sub(1),
        8 => old.wrapping_mul(2),
        9 => old / 2,
        10 => 0x7f,
        11 => 0xffff,
        12 => 0x7fff_ffff,
        13 => 0xffff_ffff,
        14 => 1 << 32,
        15 => 1 << 40,
        16 => 1 << 62,
        17 => 1 << 63,
        18 => u64::MAX,
        19 => old ^ (1 << rng.random_range(0..64)),
        20 => rng.random_range(0..100_000),
        _ => rng.random(),
    };
    if width >= 8 { v } else { v & ((1u64 << (8 * width)) - 1) }
}

// ---------------------------------------------------------------------------------------------
// GGUF: a layout scanner and writer of the test's own (independent of the engine's reader)

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cat {
    Header,
    KeyLen,
    KvType,
    Scalar,
    ArrType,
    ArrCount,
    StrLen,
    NameLen,
    Rank,
    Dim,
    TensorType,
    Offset,
}

const CATS: [Cat; 12] = [
    Cat::Header,
    Cat::KeyLen,
    Cat::KvType,
    Cat::Scalar,
    Cat::ArrType,
    Cat::ArrCount,
    Cat::StrLen,
    Cat::NameLen,
    Cat::Rank,
    Cat::Dim,
    Cat::TensorType,
    Cat::Offset,
];

#[derive(Debug, Clone, Copy)]
struct Field {
    at: usize,
    width: usize,
    cat: Cat,
}

#[derive(Debug, Clone)]
struct TensorEntry {
    name: String,
    dims: Vec<u64>,
    ty: u32,
    offset: u64,
}

/// A GGUF file taken apart: metadata values as raw bytes, the tensor table, every integer
/// field's position.
struct Scan {
    kvs: Vec<(String, u32, Vec<u8>)>,
    tensors: Vec<TensorEntry>,
    fields: Vec<Field>,
    table_end: usize,
    data_offset: usize,
}

fn scalar_width(ty: u32) -> Option<usize> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        _ => return None,
    })
}

fn scan(b: &[u8]) -> Scan {
    let u32_at = |p: usize| u32::from_le_bytes(b[p..p + 4].try_into().unwrap());
    let u64_at = |p: usize| u64::from_le_bytes(b[p..p + 8].try_into().unwrap());
    let mut fields = vec![
        Field {
            at: 4,
            width: 4,
            cat: Cat::Header,
        },
        Field {
            at: 8,
            width: 8,
            cat: Cat::Header,
        },
        Field {
            at: 16,
            width: 8,
            cat: Cat::Header,
        },
    ];
    let (n_tensors, n_kv) = (u64_at(8) as usize, u64_at(16) as usize);
    let mut p = 24;
    let string = |p: &mut usize, cat: Cat, fields: &mut Vec<Field>| {
        fields.push(Field { at: *p, width: 8, cat });
        let len = u64_at(*p) as usize;
        let s = String::from_utf8(b[*p + 8..*p + 8 + len].to_vec()).unwrap();
        *p += 8 + len;
        s
    };
    let mut kvs = Vec::new();
    for _ in 0..n_kv {
        let key = string(&mut p, Cat::KeyLen, &mut fields);
        fields.push(Field {
            at: p,
            width: 4,
            cat: Cat::KvType,
        });
        let ty = u32_at(p);
        p += 4;
        let start = p;
        match ty {
            8 => {
                string(&mut p, Cat::StrLen, &mut fields);
            }
            9 => {
                fields.push(Field {
                    at: p,
                    width: 4,
                    cat: Cat::ArrType,
                });
                fields.push(Field {
                    at: p + 4,
                    width: 8,
                    cat: Cat::ArrCount,
                });
                let (et, count) = (u32_at(p), u64_at(p + 4) as usize);
                p += 12;
                match scalar_width(et) {
                    Some(w) => p += w * count,
                    None => {
                        assert_eq!(et, 8);
                        for _ in 0..count {
                            string(&mut p, Cat::StrLen, &mut fields);
                        }
                    }
                }
            }
            _ => {
                let w = scalar_width(ty).unwrap();
                fields.push(Field {
                    at: p,
                    width: w,
                    cat: Cat::Scalar,
                });
                p += w;
            }
        }
        kvs.push((key, ty, b[start..p].to_vec()));
    }
    let mut tensors = Vec::new();
    for _ in 0..n_tensors {
        let name = string(&mut p, Cat::NameLen, &mut fields);
        fields.push(Field {
            at: p,
            width: 4,
            cat: Cat::Rank,
        });
        let rank = u32_at(p) as usize;
        p += 4;
        let mut dims = Vec::new();
        for _ in 0..rank {
            fields.push(Field {
                at: p,
                width: 8,
                cat: Cat::Dim,
            });
            dims.push(u64_at(p));
            p += 8;
        }
        fields.push(Field {
            at: p,
            width: 4,
            cat: Cat::TensorType,
        });
        fields.push(Field {
            at: p + 4,
            width: 8,
            cat: Cat::Offset,
        });
        tensors.push(TensorEntry {
            name,
            dims,
            ty: u32_at(p),
            offset: u64_at(p + 4),
        });
        p += 12;
    }
    Scan {
        kvs,
        tensors,
        fields,
        table_end: p,
        data_offset: p.div_ceil(32) * 32,
    }
}

/// Bytes of a tensor of type `ty` with `n` elements (the types the shipped model uses).
fn tensor_bytes(ty: u32, n: u64) -> u64 {
    match ty {
        0 => n * 4,
        1 => n * 2,
        2 => n / 32 * 18,
        3 => n / 32 * 20,
        8 => n / 32 * 34,
        _ => panic!("type {ty}"),
    }
}

/// A GGUF v3 file from metadata, a tensor table and the data section.
fn write_gguf(kvs: &[(String, u32, Vec<u8>)], tensors: &[TensorEntry], data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(data.len() + (4 << 20));
    let s = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((kvs.len() as u64).to_le_bytes());
    for (key, ty, value) in kvs {
        s(&mut b, key);
        b.extend(ty.to_le_bytes());
        b.extend(value);
    }
    for t in tensors {
        s(&mut b, &t.name);
        b.extend((t.dims.len() as u32).to_le_bytes());
        t.dims.iter().for_each(|d| b.extend(d.to_le_bytes()));
        b.extend(t.ty.to_le_bytes());
        b.extend(t.offset.to_le_bytes());
    }
    b.resize(b.len().div_ceil(32) * 32, 0);
    b.extend(data);
    b
}

/// The shipped model cut down to its first two blocks (same metadata, tokenizer, embedding and
/// head): a whole model that loads in a fraction of the time, for the full-construction cases.
struct Slim {
    kvs: Vec<(String, u32, Vec<u8>)>,
    tensors: Vec<TensorEntry>,
    data: Vec<u8>,
}

fn slim(real: &[u8]) -> Slim {
    let sc = scan(real);
    let kvs = sc
        .kvs
        .iter()
        .map(|(k, ty, v)| match k.as_str() {
            "llama.block_count" => (k.clone(), 4, 2u32.to_le_bytes().to_vec()),
            _ => (k.clone(), *ty, v.clone()),
        })
        .collect();
    let mut data = Vec::new();
    let mut tensors = Vec::new();
    for t in sc
        .tensors
        .iter()
        .filter(|t| !t.name.starts_with("blk.") || t.name.starts_with("blk.0.") || t.name.starts_with("blk.1."))
    {
        let size = tensor_bytes(t.ty, t.dims.iter().product()) as usize;
        let from = sc.data_offset + t.offset as usize;
        data.resize(data.len().div_ceil(32) * 32, 0);
        tensors.push(TensorEntry {
            offset: data.len() as u64,
            ..t.clone()
        });
        data.extend_from_slice(&real[from..from + size]);
    }
    Slim { kvs, tensors, data }
}

/// Mutates `buf` (a copy of `pristine`) in place; returns the byte ranges it changed (to be
/// restored from `pristine`), the length to cut the file at, and a description.
///
/// `model_fields` aims half of the field mutations at what the model loader reads (metadata
/// scalars and the tensor table) rather than at what the reader alone rejects.
fn mutate_gguf(rng: &mut ChaCha8Rng, buf: &mut [u8], sc: &Scan, model_fields: bool) -> (Vec<Range<usize>>, usize, String) {
    let mut touched = Vec::new();
    let mut desc = String::new();
    let len = buf.len();
    match rng.random_range(0..100) {
        0..60 => {
            for _ in 0..rng.random_range(1..=3) {
                const MODEL_CATS: [Cat; 4] = [Cat::Scalar, Cat::Dim, Cat::TensorType, Cat::Offset];
                let cat = if model_fields && rng.random_bool(0.5) {
                    MODEL_CATS[rng.random_range(0..MODEL_CATS.len())]
                } else {
                    CATS[rng.random_range(0..CATS.len())]
                };
                let of_cat: Vec<&Field> = sc.fields.iter().filter(|f| f.cat == cat).collect();
                let f = of_cat[rng.random_range(0..of_cat.len())];
                let mut old = [0u8; 8];
                old[..f.width].copy_from_slice(&buf[f.at..f.at + f.width]);
                let v = interesting(rng, u64::from_le_bytes(old), f.width);
                buf[f.at..f.at + f.width].copy_from_slice(&v.to_le_bytes()[..f.width]);
                touched.push(f.at..f.at + f.width);
                desc += &format!("{cat:?}@{} = {v}; ", f.at);
            }
            (touched, len, desc)
        }
        60..85 => {
            for _ in 0..rng.random_range(1..=8) {
                let at = if rng.random_bool(0.5) {
                    rng.random_range(sc.kvs_end()..sc.table_end)
                } else {
                    rng.random_range(0..sc.table_end)
                };
                let v: u8 = if rng.random_bool(0.5) {
                    buf[at] ^ (1 << rng.random_range(0..8))
                } else {
                    rng.random()
                };
                buf[at] = v;
                touched.push(at..at + 1);
                desc += &format!("byte {at} = {v}; ");
            }
            (touched, len, desc)
        }
        _ => {
            let cut = if rng.random_bool(0.5) {
                rng.random_range(0..sc.data_offset + 64)
            } else {
                rng.random_range(0..len)
            };
            (touched, cut, format!("cut at {cut}"))
        }
    }
}

impl Scan {
    /// Where the tensor table starts.
    fn kvs_end(&self) -> usize {
        self.fields.iter().find(|f| f.cat == Cat::NameLen).map_or(self.table_end, |f| f.at)
    }
}

/// A random rewrite of the slim model's metadata or tensor table that changes its layout
/// (metadata retyped, removed or added; tensor shapes, types and offsets changed).
/// Metadata as (key, type, value bytes).
type Kvs = Vec<(String, u32, Vec<u8>)>;

fn rewrite_slim(rng: &mut ChaCha8Rng, s: &Slim) -> (Kvs, Vec<TensorEntry>, String) {
    let mut kvs = s.kvs.clone();
    let mut tensors = s.tensors.clone();
    let desc;
    match rng.random_range(0..10) {
        0..4 => {
            const KEYS: [&str; 12] = [
                "llama.block_count",
                "llama.context_length",
                "llama.embedding_length",
                "llama.feed_forward_length",
                "llama.attention.head_count",
                "llama.attention.head_count_kv",
                "llama.rope.freq_base",
                "llama.attention.layer_norm_rms_epsilon",
                "llama.rope.dimension_count",
                "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.bos_token_id",
                "general.alignment",
            ];
            let key = KEYS[rng.random_range(0..KEYS.len())];
            let (ty, value): (u32, Vec<u8>) = match rng.random_range(0..8) {
                0..4 => (10, interesting(rng, 1000, 8).to_le_bytes().to_vec()),
                4 => (11, (-(rng.random_range(1..1_000_000i64))).to_le_bytes().to_vec()),
                5 => (
                    12,
                    [f64::NAN, f64::INFINITY, -1.0, 0.0, 1e300, 1e-300][rng.random_range(0..6)]
                        .to_le_bytes()
                        .to_vec(),
                ),
                6 => (
                    6,
                    [f32::NAN, f32::INFINITY, -1.0, 0.0][rng.random_range(0..4)].to_le_bytes().to_vec(),
                ),
                _ => {
                    kvs.retain(|(k, _, _)| k != key);
                    desc = format!("{key} removed");
                    return (kvs, tensors, desc);
                }
            };
            desc = format!("{key} = type {ty} {value:?}");
            match kvs.iter_mut().find(|(k, _, _)| k == key) {
                Some(kv) => *kv = (key.to_string(), ty, value),
                None => kvs.push((key.to_string(), ty, value)),
            }
        }
        4 => {
            // A u8 (or other) array whose count claims most of the file.
            let count = (s.data.len() as u64) / [1, 2, 4, 8][rng.random_range(0..4)];
            let et = [0u32, 1, 7, 4, 10, 8][rng.random_range(0..6)];
            let mut v = et.to_le_bytes().to_vec();
            v.extend(count.to_le_bytes());
            let at = rng.random_range(0..=kvs.len());
            kvs.insert(at, ("hostile.array".into(), 9, v));
            desc = format!("array of type {et} claiming {count} elements inserted at {at}");
        }
        _ => {
            let i = rng.random_range(0..tensors.len());
            let t = &mut tensors[i];
            let name = t.name.clone();
            match rng.random_range(0..7) {
                0 => t.dims.reverse(),
                1 => {
                    let d = rng.random_range(0..t.dims.len());
                    t.dims[d] = [0, 1, 32, t.dims[d] / 2, t.dims[d].wrapping_mul(2), 1 << 32, 1 << 62, u64::MAX][rng.random_range(0..8)];
                }
                2 => t.dims.push([1, 2, 32][rng.random_range(0..3)]),
                3 if t.dims.len() > 1 => {
                    t.dims.pop();
                }
                4 => t.ty = [0, 1, 2, 3, 8][rng.random_range(0..5)],
                5 => t.offset = interesting(rng, t.offset, 8),
                _ => {
                    if rng.random_bool(0.5) {
                        tensors.remove(i);
                    } else {
                        // The same data under another block's name (aliasing).
                        let mut alias = tensors[i].clone();
                        alias.name = alias.name.replace("blk.1.", "blk.2.").replace("blk.0.", "blk.2.");
                        tensors.push(alias);
                        kvs.iter_mut()
                            .filter(|(k, _, _)| k == "llama.block_count")
                            .for_each(|kv| kv.2 = 3u32.to_le_bytes().to_vec());
                    }
                }
            }
            desc = format!("tensor {name} -> {:?}", tensors.get(i).map(|t| (&t.dims, t.ty, t.offset)));
        }
    }
    (kvs, tensors, desc)
}

/// Cases whose file got as far as model construction (hyperparameters and tensor table checked
/// against each other): they loaded, or the config or a tensor was refused.
static REACHED_CONSTRUCTION: AtomicUsize = AtomicUsize::new(0);

/// Loads a (mutated) model and, when it loads, runs two tokens through it.
fn load_and_run(bytes: &[u8]) -> Result<(), kindling_engine::EngineError> {
    use kindling_engine::EngineError as E;
    use kindling_engine::gguf::GgufError as G;
    let model = Model::from_bytes(bytes, Backend::Cpu, &Backend::Cpu.device()?).inspect_err(|e| {
        // Gguf::parse raises none of these Gguf errors; the config and the tensor checks do.
        if matches!(
            e,
            E::Unsupported(_) | E::BadTensor(_) | E::Gguf(G::MissingKey(_) | G::WrongType { .. } | G::MissingTensor(_))
        ) {
            REACHED_CONSTRUCTION.fetch_add(1, Relaxed);
        }
    })?;
    REACHED_CONSTRUCTION.fetch_add(1, Relaxed);
    let mut cache = model.llama.new_cache();
    let vocab = model.llama.config().vocab_size as u32;
    model.llama.forward(&[1 % vocab, 2 % vocab], &mut cache, None, Logits::Last)?;
    Ok(())
}

// Bounds. The GGUF reader keeps at most about one copy of what it parses (strings, typed
// arrays), and the shipped file's metadata is ~2 MB: 64 MB leaves room for a mutated array
// length that makes it read tens of MB as one array before failing, and is ~30× below what
// the old reader could be made to allocate (32 bytes per u8 array element, or RoPE tables for
// 2^40 positions). A full load of the two-block model repacks ~34 MB of weights (+~20% for the
// f32 block scales), builds the tokenizer and runs two tokens; 256 MB is ~3× that.
const GGUF_PARSE_BOUND: usize = 64 * MB;
const GGUF_LOAD_BOUND: usize = 256 * MB;

const GGUF_PARSE_CASES: usize = 2000;
const GGUF_LOAD_CASES: usize = 300;
const GGUF_REWRITE_CASES: usize = 500;

#[test]
fn mutated_gguf_headers_parse_to_errors_within_bounds() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let started = std::time::Instant::now();
    let pristine = read("public/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let sc = scan(&pristine);
    let mut buf = pristine.clone();
    let mut rng = ChaCha8Rng::seed_from_u64(0x6775_6666);
    let mut stats = Stats::default();
    for _ in 0..GGUF_PARSE_CASES {
        let (touched, cut, desc) = mutate_gguf(&mut rng, &mut buf, &sc, false);
        let bytes = &buf[..cut];
        case(&mut stats, &|| desc.clone(), GGUF_PARSE_BOUND, || {
            let gguf = kindling_engine::gguf::Gguf::parse(bytes)?;
            kindling_engine::Config::from_gguf(&gguf).map(drop)
        });
        for r in touched {
            buf[r.clone()].copy_from_slice(&pristine[r]);
        }
    }
    stats.report("gguf parse (whole model)", GGUF_PARSE_BOUND, started);
}

#[test]
fn mutated_models_load_or_fail_within_bounds() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let started = std::time::Instant::now();
    let real = read("public/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let s = slim(&real);
    drop(real);
    let pristine = write_gguf(&s.kvs, &s.tensors, &s.data);
    load_and_run(&pristine).expect("the two-block model loads and runs");
    let sc = scan(&pristine);
    let mut buf = pristine.clone();
    let mut rng = ChaCha8Rng::seed_from_u64(0x6c6f_6164);
    let mut stats = Stats::default();
    for _ in 0..GGUF_LOAD_CASES {
        let (touched, cut, desc) = mutate_gguf(&mut rng, &mut buf, &sc, true);
        case(&mut stats, &|| desc.clone(), GGUF_LOAD_BOUND, || load_and_run(&buf[..cut]));
        for r in touched {
            buf[r.clone()].copy_from_slice(&pristine[r]);
        }
    }
    drop(buf);
    for _ in 0..GGUF_REWRITE_CASES {
        let (kvs, tensors, desc) = rewrite_slim(&mut rng, &s);
        let bytes = write_gguf(&kvs, &tensors, &s.data);
        case(&mut stats, &|| desc.clone(), GGUF_LOAD_BOUND, || load_and_run(&bytes));
    }
    stats.report("gguf full load (two-block model)", GGUF_LOAD_BOUND, started);
    let reached = REACHED_CONSTRUCTION.load(Relaxed);
    eprintln!("  of which {reached} reached model construction");
    assert!(reached >= 300, "only {reached} cases reached model construction");

    // The faults this test was written for, each an error naming its cause (under the same
    // allocation limit).
    LIMIT.store(GGUF_LOAD_BOUND, Relaxed);
    let set = |key: &str, ty: u32, value: Vec<u8>| {
        let mut kvs = s.kvs.clone();
        kvs.iter_mut()
            .filter(|(k, _, _)| k == key)
            .for_each(|kv| *kv = (key.to_string(), ty, value.clone()));
        write_gguf(&kvs, &s.tensors, &s.data)
    };
    let err = |bytes: Vec<u8>| load_and_run(&bytes).expect_err("must be refused").to_string();
    let e = err(set("llama.context_length", 10, (1u64 << 40).to_le_bytes().to_vec()));
    assert!(e.contains("context_length"), "{e}");
    let e = err(set("llama.attention.head_count", 4, 5u32.to_le_bytes().to_vec()));
    assert!(e.contains("head"), "{e}");
    let mut tensors = s.tensors.clone();
    let down = tensors.iter_mut().find(|t| t.name == "blk.0.ffn_down.weight").unwrap();
    down.dims.reverse();
    let e = err(write_gguf(&s.kvs, &tensors, &s.data));
    assert!(e.contains("blk.0.ffn_down.weight") && e.contains("shape"), "{e}");
    let mut tensors = s.tensors.clone();
    let norm = tensors.iter_mut().find(|t| t.name == "output_norm.weight").unwrap();
    norm.dims = vec![1 << 62];
    let e = err(write_gguf(&s.kvs, &tensors, &s.data));
    assert!(e.contains("output_norm.weight"), "{e}");
    LIMIT.store(usize::MAX, Relaxed);
}

// ---------------------------------------------------------------------------------------------
// safetensors

/// A safetensors file's header JSON and data section.
fn st_parse(bytes: &[u8]) -> (Value, &[u8]) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&bytes[8..8 + n]).unwrap(), &bytes[8 + n..])
}

fn st_write(header: &Value, data: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(header).unwrap();
    let mut b = Vec::with_capacity(8 + h.len() + data.len());
    b.extend((h.len() as u64).to_le_bytes());
    b.extend(h);
    b.extend(data);
    b
}

const DTYPES: [&str; 16] = [
    "F16", "BF16", "F32", "F64", "I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "BOOL", "F8_E4M3", "F4", "Q4",
];

fn interesting_json(rng: &mut ChaCha8Rng, old: &Value) -> Value {
    match rng.random_range(0..14) {
        0 => json!(0),
        1 => json!(1),
        2 => json!(-1),
        3 => json!(1u64 << 40),
        4 => json!(u64::MAX),
        5 => json!(1.5),
        6 => json!("blocks.99999999999999999999.hook_resid_post"),
        7 => Value::Null,
        8 => json!([]),
        9 => json!({}),
        10 => json!(true),
        11 => match old.as_u64() {
            Some(v) => json!(v.wrapping_mul(2)),
            None => json!("x"),
        },
        12 => match old.as_u64() {
            Some(v) => json!(v / 2),
            None => json!(""),
        },
        _ => match old {
            Value::Array(a) if !a.is_empty() => {
                let mut a = a.clone();
                match rng.random_range(0..3) {
                    0 => a.truncate(rng.random_range(0..a.len())),
                    1 => {
                        let i = rng.random_range(0..a.len());
                        a[i] = json!(7);
                    }
                    _ => {
                        let i = rng.random_range(0..a.len());
                        a.remove(i);
                    }
                }
                Value::Array(a)
            }
            Value::String(s) => json!(format!("{s}x")),
            _ => json!(u32::MAX),
        },
    }
}

/// Mutates one field of the JSON config stored as a string under `__metadata__.key`.
fn mutate_metadata(rng: &mut ChaCha8Rng, header: &mut Value, key: &str) -> String {
    let Some(text) = header["__metadata__"][key].as_str() else {
        return "no metadata".into();
    };
    if rng.random_range(0..8) == 0 {
        header["__metadata__"][key] = json!(&text[..rng.random_range(0..text.len())]);
        return format!("metadata {key} cut");
    }
    let mut cfg: Value = serde_json::from_str(text).unwrap();
    // Walk down at most two levels of objects.
    let mut path: Vec<String> = Vec::new();
    let mut at = &cfg;
    for _ in 0..2 {
        let Value::Object(m) = at else { break };
        if m.is_empty() {
            break;
        }
        let k = m.keys().nth(rng.random_range(0..m.len())).unwrap().clone();
        at = &m[&k];
        path.push(k);
        if !at.is_object() || rng.random_bool(0.5) {
            break;
        }
    }
    let new = interesting_json(rng, at);
    let pointer: String = path
        .iter()
        .map(|k| format!("/{}", k.replace('~', "~0").replace('/', "~1")))
        .collect();
    *cfg.pointer_mut(&pointer).unwrap() = new;
    header["__metadata__"][key] = json!(cfg.to_string());
    format!("metadata {key}.{}", path.join("."))
}

/// One random mutation of a safetensors file whose config lives in `__metadata__.meta_key`.
fn mutate_safetensors(rng: &mut ChaCha8Rng, header: &Value, data: &[u8], meta_key: &str) -> (Vec<u8>, String) {
    let mut h = header.clone();
    let names: Vec<String> = h.as_object().unwrap().keys().filter(|k| *k != "__metadata__").cloned().collect();
    let name = names[rng.random_range(0..names.len())].clone();
    let desc = match rng.random_range(0..12) {
        0 => {
            let dt = DTYPES[rng.random_range(0..DTYPES.len())];
            h[&name]["dtype"] = json!(dt);
            format!("{name} dtype {dt}")
        }
        1 | 2 => {
            let shape = h[&name]["shape"].as_array_mut().unwrap();
            if shape.is_empty() {
                shape.push(json!(1));
            }
            let i = rng.random_range(0..shape.len());
            let old = shape[i].as_u64().unwrap();
            shape[i] = json!(interesting(rng, old, 8));
            format!("{name} shape[{i}] = {}", shape[i])
        }
        3 => {
            // Same byte size, other shape (passes safetensors' own checks).
            let shape: Vec<u64> = h[&name]["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
            let n: u64 = shape.iter().product();
            let new = match rng.random_range(0..4) {
                0 => shape.iter().rev().copied().collect(),
                1 => vec![n],
                2 if n.is_multiple_of(2) => vec![2, n / 2],
                _ => {
                    let mut s = shape.clone();
                    s.insert(rng.random_range(0..=s.len()), 1);
                    s
                }
            };
            h[&name]["shape"] = json!(new);
            format!("{name} reshaped to {new:?}")
        }
        4 => {
            // Other dtype of another width, shape adjusted to keep the byte size.
            let dt = h[&name]["dtype"].as_str().unwrap().to_string();
            let width = |d: &str| match d {
                "F64" | "I64" | "U64" => 8,
                "F32" | "I32" | "U32" => 4,
                "F16" | "BF16" | "I16" | "U16" => 2,
                _ => 1,
            };
            let new_dt = ["F32", "F16", "U8", "I8", "U16", "F64"][rng.random_range(0..6)];
            let bytes: u64 = h[&name]["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .product::<u64>()
                * width(&dt);
            if bytes.is_multiple_of(width(new_dt)) {
                h[&name]["dtype"] = json!(new_dt);
                h[&name]["shape"] = json!([bytes / width(new_dt)]);
            }
            format!("{name} as {new_dt}")
        }
        5 => {
            let i = rng.random_range(0..2);
            let old = h[&name]["data_offsets"][i].as_u64().unwrap();
            h[&name]["data_offsets"][i] = json!(interesting(rng, old, 8));
            format!("{name} data_offsets[{i}] = {}", h[&name]["data_offsets"][i])
        }
        6 => {
            let obj = h.as_object_mut().unwrap();
            let t = obj.remove(&name).unwrap();
            if rng.random_bool(0.5) {
                obj.insert(format!("{name}_"), t);
            }
            format!("{name} removed or renamed")
        }
        7..10 => mutate_metadata(rng, &mut h, meta_key),
        10 => {
            let mut b = st_write(&h, data);
            let hlen = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
            let mut d = String::new();
            for _ in 0..rng.random_range(1..=4) {
                let at = rng.random_range(0..8 + hlen);
                b[at] = if at < 8 {
                    rng.random()
                } else {
                    b[at] ^ (1 << rng.random_range(0..8))
                };
                d += &format!("byte {at}; ");
            }
            return (b, d);
        }
        _ => {
            let mut b = st_write(&h, data);
            let cut = rng.random_range(0..b.len());
            b.truncate(cut);
            return (b, format!("cut at {cut}"));
        }
    };
    (st_write(&h, data), desc)
}

const SAE_BOUND: usize = 256 * MB;
const ATLAS_BOUND: usize = 256 * MB;
const SAE_COMPACT_CASES: usize = 300;
const SAE_SAELENS_CASES: usize = 150;
const EMBEDDER_CASES: usize = 300;
const CONTEXTS_CASES: usize = 300;
const INDEX_CASES: usize = 30;

/// Uses an SAE that loaded: encode and decode one row.
fn use_sae(sae: Sae) {
    let x = vec![0.5f32; sae.config().d_in];
    let f = sae.encode(&x);
    let _ = sae.decode(&f[0]);
}

// The SAE files: 19 MB of f16 (compact) or 38 MB of f32 (SAELens). Loading keeps the f32
// weights (38 MB), the 8-bit encoder (5 MB) and, transiently, the file's tensors as f32
// again; 256 MB is ~3× the largest honest load.
#[test]
fn mutated_sae_files_load_or_fail_within_bounds() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let started = std::time::Instant::now();
    let compact = read("public/sae/kindling-sae.f16.safetensors");
    let (header, data) = st_parse(&compact);
    let mut rng = ChaCha8Rng::seed_from_u64(0x7361_6531);
    let mut stats = Stats::default();
    for _ in 0..SAE_COMPACT_CASES {
        let (bytes, desc) = mutate_safetensors(&mut rng, &header, data, "kindling_sae");
        case(&mut stats, &|| desc.clone(), SAE_BOUND, || Sae::from_compact(&bytes).map(use_sae));
    }
    // The SAELens files are not committed: mutate the export of the compact file.
    let export = kindling_engine::sae::saelens_from_compact(&compact).unwrap();
    drop(compact);
    let weights = export.weights;
    let cfg_json: Value = serde_json::from_str(&export.cfg_json).unwrap();
    let (header, data) = st_parse(&weights);
    // The SAELens config travels as its own file: mutate it as if it were metadata.
    let mut with_cfg = header.clone();
    with_cfg["__metadata__"] = json!({"cfg": cfg_json.to_string()});
    for _ in 0..SAE_SAELENS_CASES {
        let (bytes, desc) = mutate_safetensors(&mut rng, &with_cfg, data, "cfg");
        let cfg = st_cfg(&bytes).unwrap_or_else(|| cfg_json.to_string());
        case(&mut stats, &|| desc.clone(), SAE_BOUND, || {
            Sae::from_saelens(&cfg, &bytes).map(use_sae)
        });
    }
    stats.report("sae (compact + SAELens)", SAE_BOUND, started);
}

/// The `cfg` JSON carried in a mutated file's metadata, unless the mutation broke the header.
fn st_cfg(bytes: &[u8]) -> Option<String> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let h: Value = serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    Some(h["__metadata__"]["cfg"].as_str()?.to_string())
}

// The atlas: the embedder (8 MB of i8 → a 32 MB f32 table and a 30k-word vocabulary), the
// contexts (10 MB → 14 MB in memory) and the index (5.5 MB of JSON → ~20 MB of structs plus
// 8 MB of label vectors). 256 MB is ~4× the largest honest load.
#[test]
fn mutated_atlas_files_load_or_fail_within_bounds() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let started = std::time::Instant::now();
    let mut rng = ChaCha8Rng::seed_from_u64(0x6174_6c61);
    let mut stats = Stats::default();
    let embedder_bytes = read("public/atlas/embedder.safetensors");
    let (header, data) = st_parse(&embedder_bytes);
    for _ in 0..EMBEDDER_CASES {
        let (bytes, desc) = mutate_safetensors(&mut rng, &header, data, "kindling_embedder");
        case(&mut stats, &|| desc.clone(), ATLAS_BOUND, || {
            StaticEmbedder::from_safetensors(&bytes).map(|e| e.embed("talk like a pirate, héllo 世界"))
        });
    }
    // Embedding widths of 0 (once a chunks_exact(0) panic) and over the limit.
    for dim in [0u64, 4096] {
        let meta = json!({"version": 1, "dim": dim, "vocab": ["[UNK]", "[CLS]", "[SEP]"]}).to_string();
        let n = 3 * dim;
        let header = json!({
            "__metadata__": {"kindling_embedder": meta},
            "embeddings": {"dtype": "I8", "shape": [3, dim], "data_offsets": [0, n]},
            "scales": {"dtype": "F32", "shape": [3], "data_offsets": [n, n + 12]},
        });
        let bytes = st_write(&header, &vec![1u8; n as usize + 12]);
        case(&mut stats, &|| format!("embedder of width {dim}"), ATLAS_BOUND, || {
            StaticEmbedder::from_safetensors(&bytes).map(drop)
        });
        let e = StaticEmbedder::from_safetensors(&bytes).unwrap_err().to_string();
        assert!(e.contains("width"), "{e}");
    }
    let embedder = StaticEmbedder::from_safetensors(&embedder_bytes).unwrap();
    drop(embedder_bytes);
    let sae = Sae::from_compact(&read("public/sae/kindling-sae.f16.safetensors")).unwrap();
    let index = String::from_utf8(read("public/atlas/atlas.json")).unwrap();
    let mut atlas = Atlas::from_index(&index, &sae, embedder.clone()).unwrap();

    let contexts = read("public/atlas/contexts.safetensors");
    let (header, data) = st_parse(&contexts);
    for _ in 0..CONTEXTS_CASES {
        let (bytes, desc) = mutate_safetensors(&mut rng, &header, data, "kindling_atlas_contexts");
        case(&mut stats, &|| desc.clone(), ATLAS_BOUND, || {
            atlas.load_contexts(&bytes)?;
            for f in [0, 1, atlas.d_sae() as u32 - 1] {
                atlas.contexts(f)?;
            }
            Ok::<(), kindling_engine::AtlasError>(())
        });
    }

    let map = read("public/atlas/map.safetensors");
    let (header, data) = st_parse(&map);
    for _ in 0..CONTEXTS_CASES {
        let (bytes, desc) = mutate_safetensors(&mut rng, &header, data, "kindling_atlas_map");
        case(&mut stats, &|| desc.clone(), ATLAS_BOUND, || {
            atlas.load_map(&bytes)?;
            let map = atlas.map().expect("loaded");
            let _ = map.region_centres();
            Ok::<(), kindling_engine::AtlasError>(())
        });
    }

    let parsed: Value = serde_json::from_str(&index).unwrap();
    for _ in 0..INDEX_CASES {
        let mut v = parsed.clone();
        let desc = match rng.random_range(0..3) {
            0 => {
                let features = v["features"].as_array_mut().unwrap();
                let i = rng.random_range(0..features.len());
                let keys: Vec<String> = features[i].as_object().unwrap().keys().cloned().collect();
                let k = &keys[rng.random_range(0..keys.len())];
                let new = interesting_json(&mut rng, &features[i][k]);
                features[i][k] = new;
                format!("features[{i}].{k}")
            }
            1 => {
                let keys = ["format", "version", "sae", "model_sha256", "features"];
                let k = keys[rng.random_range(0..keys.len())];
                let new = interesting_json(&mut rng, &v[k]);
                v[k] = new;
                k.to_string()
            }
            _ => {
                let sae_keys = ["layer", "d_sae", "compact_sha256"];
                let k = sae_keys[rng.random_range(0..sae_keys.len())];
                let new = interesting_json(&mut rng, &v["sae"][k]);
                v["sae"][k] = new;
                format!("sae.{k}")
            }
        };
        let text = v.to_string();
        case(&mut stats, &|| desc.clone(), ATLAS_BOUND, || {
            Atlas::from_index(&text, &sae, embedder.clone()).map(|a| a.search("pirate", 5).len())
        });
    }
    stats.report("atlas (embedder, contexts, index)", ATLAS_BOUND, started);
}
