#!/usr/bin/env python3
"""Lays every live SAE latent out in 2-D for the Features tab's map (public/atlas/map.safetensors).

Where a latent lands is decided by what its label means: each label is embedded with the
atlas's own static embedder (embedder.safetensors, the table search ranks with), and UMAP
(cosine metric) places the 8,192 vectors in the plane. So a search's hits, ranked by the same
vectors, light up as a region of the map. The decoder directions themselves give no usable map:
in 576 dimensions they are close to orthogonal, and UMAP of them is a structureless disc
(docs/ATLAS.md).

Regions: k-means on the 2-D layout, each region named by the two label words that are both
common in it and particular to it (count in the region squared over the count overall).

Output (safetensors, about 40 KB):
  * `xy`      u16 [d_sae, 2]: position, scaled to 0..65535 on each axis;
  * `region`  u8  [d_sae]: the latent's region, 255 for a dead latent (not drawn);
  * metadata `kindling_atlas_map`: version, the SAE's compact_sha256, the sha256 of the
    atlas.json whose labels placed the points (a map older than its labels is stale), the
    region names, and how it was made.
The manifest (manifest.json) gets the file's entry and a `map` section.

Run through scripts/build-map.sh (pinned packages in a cached virtualenv). Deterministic for a
given atlas and package set (fixed seeds, one thread).
"""

import argparse
import collections
import hashlib
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
from tokenizers import BertWordPieceTokenizer

MAP_VERSION = 1
MAP_FILE = "map.safetensors"
NO_REGION = 255
# Words that name no theme: in labels they are mostly the firing tokens of grammar latents.
STOP = set(
    "a an the of to in on at for and or but is are was were be been it its this that these those with by from as "
    "not no so if then than he she they we you i me my your our their his her them us do does did have has had "
    "can could will would should may might must just very more most some any all one two s t".split()
)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def label_vectors(atlas_dir, labels):
    """Each label's unit embedding under the atlas's static embedder: WordPiece (BERT
    uncased), the sum of the tokens' scaled rows, normalised, as engine/src/embed.rs does."""
    table = safe_open(str(atlas_dir / "embedder.safetensors"), "np")
    meta = json.loads(table.metadata()["kindling_embedder"])
    vocab = {token: i for i, token in enumerate(meta["vocab"])}
    rows = table.get_tensor("embeddings").astype(np.float32) * table.get_tensor("scales")[:, None]
    wordpiece = BertWordPieceTokenizer(vocab, lowercase=True, strip_accents=True)
    out = np.zeros((len(labels), rows.shape[1]), np.float32)
    for i, label in enumerate(labels):
        ids = wordpiece.encode(label, add_special_tokens=False).ids
        if ids:
            out[i] = rows[ids].sum(0)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms > 0, norms, 1), meta


def words(label):
    return [w for w in re.findall(r"[a-z][a-z']+", label.lower()) if w not in STOP and len(w) > 2]


def region_names(labels, regions, count):
    overall = collections.Counter(w for label in labels for w in set(words(label)))
    names = []
    for r in range(count):
        inside = collections.Counter(w for label, g in zip(labels, regions) if g == r for w in set(words(label)))
        ranked = sorted(inside, key=lambda w: (-inside[w] ** 2 / overall[w], w))
        names.append(", ".join(ranked[:2]) or f"region {r}")
    return names


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--atlas", type=Path, default=Path("public/atlas"))
    parser.add_argument("--neighbors", type=int, default=15)
    parser.add_argument("--min-dist", type=float, default=0.05)
    parser.add_argument("--regions", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import umap  # imported late: it takes seconds (numba)
    from sklearn.cluster import KMeans

    started = time.time()
    index_path = args.atlas / "atlas.json"
    index = json.loads(index_path.read_text())
    features = index["features"]
    live = np.array([f["label_source"] != "dead" for f in features])
    labels = [f["label"] for f in features]
    print(f"map: {live.sum()} live latents of {len(features)}; embedding their labels", file=sys.stderr)
    vectors, _ = label_vectors(args.atlas, labels)
    live &= np.linalg.norm(vectors, axis=1) > 0

    print(f"map: UMAP (cosine, {args.neighbors} neighbours, min_dist {args.min_dist})", file=sys.stderr)
    layout = umap.UMAP(
        n_neighbors=args.neighbors, min_dist=args.min_dist, metric="cosine", random_state=args.seed, verbose=True
    ).fit_transform(vectors[live])
    # Scale each axis to 0..65535, ignoring the farthest 0.5% so that a few outliers do not
    # squeeze the rest into a corner (they are clamped to the edge).
    low, high = np.percentile(layout, 0.25, axis=0), np.percentile(layout, 99.75, axis=0)
    scaled = np.clip((layout - low) / (high - low), 0, 1)
    xy = np.zeros((len(features), 2), np.uint16)
    xy[live] = np.round(scaled * 65535).astype(np.uint16)

    print(f"map: {args.regions} regions", file=sys.stderr)
    kmeans = KMeans(n_clusters=args.regions, n_init=10, random_state=args.seed).fit(scaled)
    region = np.full(len(features), NO_REGION, np.uint8)
    region[live] = kmeans.labels_.astype(np.uint8)
    live_labels = [label for label, alive in zip(labels, live) if alive]
    names = region_names(live_labels, kmeans.labels_, args.regions)

    compact_sha256 = index["sae"]["compact_sha256"]
    atlas_sha256 = sha256(index_path)
    method = {
        "embedding": "label vectors under embedder.safetensors (the search embedder)",
        "layout": f"umap-learn {umap.__version__} UMAP, cosine, n_neighbors {args.neighbors}, min_dist {args.min_dist}, seed {args.seed}",
        "regions": f"k-means ({args.regions}) on the layout, named by their most common and particular label words",
    }
    meta = {
        "version": MAP_VERSION,
        "compact_sha256": compact_sha256,
        "atlas_sha256": atlas_sha256,
        "regions": names,
        "method": method,
    }
    out = args.atlas / MAP_FILE
    save_file({"xy": xy, "region": region}, str(out), metadata={"kindling_atlas_map": json.dumps(meta)})

    manifest_path = args.atlas / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"] = [f for f in manifest["files"] if f["file"] != MAP_FILE] + [
        {"bytes": out.stat().st_size, "file": MAP_FILE, "sha256": sha256(out)}
    ]
    manifest["total_bytes"] = sum(f["bytes"] for f in manifest["files"])
    manifest["map"] = {
        "points": int(live.sum()),
        "regions": names,
        "atlas_sha256": atlas_sha256,
        "method": method,
        "command": "scripts/build-map.sh",
    }
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print(f"map: wrote {out} ({out.stat().st_size} bytes) in {time.time() - started:.0f} s; regions:", file=sys.stderr)
    for r, name in enumerate(names):
        print(f"  {r:2} {int((region == r).sum()):4}  {name}", file=sys.stderr)


if __name__ == "__main__":
    main()
