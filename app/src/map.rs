//! The feature map's data and geometry, without a DOM (the canvas is
//! `components/map.rs`): the points of a `GET features/map` answer, the view's pan and zoom,
//! and which point the pointer is on.

use std::collections::HashMap;

use serde_json::Value;

/// Buckets per side of the grid that finds the point under the pointer.
const GRID: usize = 64;
/// The map's side at zoom 1, as a share of the canvas's shorter side.
const FILL: f64 = 0.92;
/// How far in the view zooms.
const MAX_ZOOM: f64 = 64.0;

/// The map's points (grouped by region, so the canvas sets each colour once) and regions.
#[derive(Debug, Clone, PartialEq)]
pub struct MapData {
    indices: Vec<u32>,
    labels: Vec<String>,
    /// In the unit square.
    positions: Vec<(f64, f64)>,
    /// Each region's number and points, in region order.
    groups: Vec<(u8, Vec<usize>)>,
    /// Each region's name and centre.
    regions: Vec<(String, (f64, f64))>,
    by_index: HashMap<u32, usize>,
    /// `GRID × GRID` buckets of points, row by row.
    grid: Vec<Vec<usize>>,
}

impl MapData {
    /// Reads a `GET features/map` answer, or says what is wrong with it.
    pub fn from_answer(answer: &Value) -> Result<Self, String> {
        let regions: Vec<(String, (f64, f64))> = answer["regions"]
            .as_array()
            .ok_or("the answer has no regions")?
            .iter()
            .map(|r| {
                let name = r["name"].as_str().ok_or("a region without a name")?;
                Ok((name.to_string(), (unit(&r["x"])?, unit(&r["y"])?)))
            })
            .collect::<Result<_, String>>()?;
        let points = answer["points"].as_array().ok_or("the answer has no points")?;
        let mut data = MapData {
            indices: Vec::with_capacity(points.len()),
            labels: Vec::with_capacity(points.len()),
            positions: Vec::with_capacity(points.len()),
            groups: (0..regions.len()).map(|r| (r as u8, Vec::new())).collect(),
            regions,
            by_index: HashMap::with_capacity(points.len()),
            grid: vec![Vec::new(); GRID * GRID],
        };
        for (n, p) in points.iter().enumerate() {
            let index = p["index_in_sae"]
                .as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .ok_or("a point without an index")?;
            let region = p["region"].as_u64().map(|r| r as usize).filter(|&r| r < data.groups.len());
            let region = region.ok_or_else(|| format!("feature {index}'s region is not one of the {}", data.groups.len()))?;
            let position = (unit(&p["x"])?, unit(&p["y"])?);
            data.indices.push(index);
            data.labels.push(p["label"].as_str().unwrap_or_default().to_string());
            data.positions.push(position);
            data.groups[region].1.push(n);
            data.by_index.insert(index, n);
            data.grid[bucket(position.1) * GRID + bucket(position.0)].push(n);
        }
        Ok(data)
    }

    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// Point `n`'s feature index and label.
    pub fn feature(&self, n: usize) -> (u32, &str) {
        (self.indices[n], &self.labels[n])
    }

    pub fn position(&self, n: usize) -> (f64, f64) {
        self.positions[n]
    }

    /// Where feature `index` is, if the map shows it.
    pub fn position_of(&self, index: u32) -> Option<(f64, f64)> {
        self.by_index.get(&index).map(|&n| self.positions[n])
    }

    /// Each region's number and points.
    pub fn by_region(&self) -> impl Iterator<Item = (u8, &[usize])> {
        self.groups.iter().map(|(r, points)| (*r, points.as_slice()))
    }

    /// Each region's name and centre.
    pub fn regions(&self) -> impl Iterator<Item = (&str, (f64, f64))> {
        self.regions.iter().map(|(name, centre)| (name.as_str(), *centre))
    }

    /// The point nearest to screen position `(x, y)` within `radius` pixels. Looks only in
    /// the grid buckets the radius reaches, so a hover costs a few points, not all of them.
    pub fn nearest(&self, view: &MapView, x: f64, y: f64, radius: f64) -> Option<usize> {
        let (wx, wy) = view.to_world(x, y);
        let reach = radius / view.scale();
        let span = |c: f64| bucket(c - reach)..=bucket(c + reach);
        let mut best: Option<(f64, usize)> = None;
        for row in span(wy) {
            for column in span(wx) {
                for &n in &self.grid[row * GRID + column] {
                    let (sx, sy) = view.to_screen(self.positions[n]);
                    let distance = (sx - x).hypot(sy - y);
                    if distance <= radius && best.is_none_or(|(d, _)| distance < d) {
                        best = Some((distance, n));
                    }
                }
            }
        }
        best.map(|(_, n)| n)
    }
}

/// A coordinate of the answer, which must lie in `[0, 1]`.
fn unit(value: &Value) -> Result<f64, String> {
    value
        .as_f64()
        .filter(|v| (0.0..=1.0).contains(v))
        .ok_or_else(|| format!("a coordinate {value} outside [0, 1]"))
}

/// The grid bucket of a unit-square coordinate (clamped at the edges).
fn bucket(c: f64) -> usize {
    ((c * GRID as f64).floor().max(0.0) as usize).min(GRID - 1)
}

/// The view's pan and zoom over a canvas of `width × height` CSS pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MapView {
    pub zoom: f64,
    /// The unit-square point at the canvas's centre.
    centre: (f64, f64),
    width: f64,
    height: f64,
}

impl Default for MapView {
    fn default() -> Self {
        MapView {
            zoom: 1.0,
            centre: (0.5, 0.5),
            width: 1.0,
            height: 1.0,
        }
    }
}

impl MapView {
    /// Pixels per unit of the map.
    pub fn scale(&self) -> f64 {
        self.width.min(self.height) * FILL * self.zoom
    }

    pub fn resize(&mut self, width: f64, height: f64) {
        (self.width, self.height) = (width.max(1.0), height.max(1.0));
    }

    pub fn to_screen(&self, (x, y): (f64, f64)) -> (f64, f64) {
        let s = self.scale();
        (
            (x - self.centre.0) * s + self.width / 2.0,
            (y - self.centre.1) * s + self.height / 2.0,
        )
    }

    pub fn to_world(&self, x: f64, y: f64) -> (f64, f64) {
        let s = self.scale();
        (
            (x - self.width / 2.0) / s + self.centre.0,
            (y - self.height / 2.0) / s + self.centre.1,
        )
    }

    /// Moves the map by `(dx, dy)` pixels, keeping its centre within the map.
    pub fn pan(&mut self, dx: f64, dy: f64) {
        let s = self.scale();
        self.centre = ((self.centre.0 - dx / s).clamp(0.0, 1.0), (self.centre.1 - dy / s).clamp(0.0, 1.0));
    }

    /// Zooms by `factor` about screen point `(x, y)`, which stays where it is.
    pub fn zoom_at(&mut self, x: f64, y: f64, factor: f64) {
        let before = self.to_world(x, y);
        self.zoom = (self.zoom * factor).clamp(1.0, MAX_ZOOM);
        let after = self.to_world(x, y);
        self.centre = (
            (self.centre.0 + before.0 - after.0).clamp(0.0, 1.0),
            (self.centre.1 + before.1 - after.1).clamp(0.0, 1.0),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn answer() -> Value {
        json!({
            "regions": [{ "name": "food", "x": 0.2, "y": 0.2 }, { "name": "numbers", "x": 0.8, "y": 0.8 }],
            "points": [
                { "index_in_sae": 7, "label": "pizza", "x": 0.2, "y": 0.2, "region": 0 },
                { "index_in_sae": 9, "label": "bread", "x": 0.21, "y": 0.2, "region": 0 },
                { "index_in_sae": 400, "label": "digits", "x": 0.8, "y": 0.8, "region": 1 },
            ],
        })
    }

    #[test]
    fn reads_points_by_region_and_refuses_broken_answers() {
        let data = MapData::from_answer(&answer()).unwrap();
        assert_eq!(data.len(), 3);
        let groups: Vec<(u8, Vec<usize>)> = data.by_region().map(|(r, p)| (r, p.to_vec())).collect();
        assert_eq!(groups, [(0, vec![0, 1]), (1, vec![2])]);
        assert_eq!(data.position_of(400), Some((0.8, 0.8)));
        assert_eq!(data.position_of(8), None);
        assert_eq!(data.feature(1), (9, "bread"));

        let mut outside = answer();
        outside["points"][0]["x"] = json!(1.5);
        assert!(MapData::from_answer(&outside).unwrap_err().contains("outside"));
        let mut unnamed = answer();
        unnamed["points"][2]["region"] = json!(2);
        assert!(MapData::from_answer(&unnamed).unwrap_err().contains("region"));
        assert!(MapData::from_answer(&json!({ "error": "no map" })).is_err());
    }

    #[test]
    fn hovering_finds_the_nearest_point_within_the_radius_at_any_zoom() {
        let data = MapData::from_answer(&answer()).unwrap();
        let mut view = MapView::default();
        view.resize(500.0, 500.0);
        let (x, y) = view.to_screen((0.8, 0.8));
        assert_eq!(data.nearest(&view, x + 3.0, y, 7.0), Some(2));
        assert_eq!(data.nearest(&view, x + 30.0, y, 7.0), None);
        // pizza and bread are 4.6 px apart at zoom 1: the nearer one wins.
        let (px, py) = view.to_screen((0.2, 0.2));
        assert_eq!(data.nearest(&view, px - 1.0, py, 7.0), Some(0));
        assert_eq!(data.nearest(&view, px + 4.0, py, 7.0), Some(1));
        // Zoomed in about pizza, pizza stays under the pointer and bread moves away.
        view.zoom_at(px, py, 10.0);
        let (zx, zy) = view.to_screen((0.2, 0.2));
        assert!((zx - px).abs() < 1e-6 && (zy - py).abs() < 1e-6, "{zx} {zy} vs {px} {py}");
        let (bx, _) = view.to_screen((0.21, 0.2));
        assert!(bx - px > 40.0, "{bx} {px}");
        assert_eq!(data.nearest(&view, px + 4.0, py, 7.0), Some(0));
    }

    #[test]
    fn the_view_pans_and_zooms_within_bounds() {
        let mut view = MapView::default();
        view.resize(800.0, 400.0);
        assert_eq!(view.to_screen((0.5, 0.5)), (400.0, 200.0));
        let world = view.to_world(123.0, 45.0);
        let back = view.to_screen(world);
        assert!((back.0 - 123.0).abs() < 1e-9 && (back.1 - 45.0).abs() < 1e-9);
        view.pan(view.scale() * 0.1, 0.0);
        assert!(
            (view.to_world(400.0, 200.0).0 - 0.4).abs() < 1e-9,
            "dragging right shows what lies left"
        );
        view.pan(1e6, 1e6);
        assert_eq!(view.to_world(400.0, 200.0), (0.0, 0.0), "the centre stays on the map");
        view.zoom_at(0.0, 0.0, 1e9);
        assert_eq!(view.zoom, MAX_ZOOM);
        view.zoom_at(0.0, 0.0, 1e-9);
        assert_eq!(view.zoom, 1.0);
    }
}
