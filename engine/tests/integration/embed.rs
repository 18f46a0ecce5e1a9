//! The shipped static embedder (public/atlas/embedder.safetensors) finds labels by meaning.

use kindling_engine::StaticEmbedder;

fn embedder() -> StaticEmbedder {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../public/atlas/embedder.safetensors");
    StaticEmbedder::from_safetensors(&std::fs::read(path).expect("public/atlas/embedder.safetensors")).unwrap()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn queries_find_the_label_with_their_meaning() {
    let e = embedder();
    let labels = [
        "jokes, humor and comedy",
        "pirates, sailors and ships at sea",
        "the French language",
        "numbers and counting",
        "computer programming and source code",
        "food, cooking and meals",
        "sadness, grief and loss",
        "greetings such as hello and hi",
        "asking questions",
        "weather and rain",
    ];
    let label_vectors: Vec<Vec<f32>> = labels.iter().map(|l| e.embed(l)).collect();
    let queries = [
        ("funny", 0),
        ("talk like a pirate", 1),
        ("speak French", 2),
        ("digits", 3),
        ("python functions", 4),
        ("recipes", 5),
        ("feeling unhappy", 6),
        ("hello there", 7),
        ("inquiry", 8),
        ("sunny or stormy", 9),
        ("comedian", 0),
        ("boat captain", 1),
        ("paris", 2),
        ("seven hundred", 3),
        ("javascript bug", 4),
        ("dinner", 5),
        ("crying", 6),
        ("good morning", 7),
        ("snow", 9),
    ];
    let mut misses = Vec::new();
    for (query, expected) in queries {
        let q = e.embed(query);
        let best = (0..labels.len())
            .max_by(|&a, &b| dot(&q, &label_vectors[a]).total_cmp(&dot(&q, &label_vectors[b])))
            .unwrap();
        if best != expected {
            misses.push(format!("{query:?} → {:?} (wanted {:?})", labels[best], labels[expected]));
        }
    }
    assert!(misses.is_empty(), "{misses:#?}");
}

#[test]
fn rejects_a_truncated_file() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../public/atlas/embedder.safetensors");
    let bytes = std::fs::read(path).unwrap();
    let err = StaticEmbedder::from_safetensors(&bytes[..bytes.len() / 2]).unwrap_err();
    assert!(err.to_string().contains("embedder file"), "{err}");
}
