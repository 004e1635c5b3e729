//! Scorer of the shapes benchmark: reads a picture back into colored blobs and checks a parsed
//! caption against them (object present, attribute binding, spatial relation, count).
//!
//! 1. Segment by color. A pixel is background when dark (value < `MIN_VALUE`); otherwise it takes
//!    the palette color of nearest hue (within `MAX_HUE_DISTANCE`) when saturated, white when
//!    unsaturated and bright, and nothing in between. Hue and saturation do not change when an edge
//!    pixel is blended with the black background, so anti-aliased edges fall into the right color or
//!    into the background, never into a third color.
//!    A pixel that 6 of its 8 neighbors outvote takes their label (pinholes and specks of noise).
//! 2. Connected components of each color (8-neighborhood); components smaller than
//!    `MIN_BLOB_FRACTION` of the image are noise and dropped.
//! 3. Classify each blob by the best intersection over union with the generator's upright circle,
//!    square and triangle of the blob's own area and centroid; size from that shape's radius.
//! 4. Check the prompt: objects match distinct blobs; a relation holds when the subject's centroid
//!    lies in the 90-degree cone of the relation's direction seen from the object's centroid
//!    (at least `MIN_RELATION_OFFSET` away); a count is exact among blobs of that color and shape.

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::data::prompt::{Category, Color, ObjectSpec, Prompt, Relation, Shape, Size};
use crate::data::shapes::{SceneObject, SQUARE_HALF_SIDE};

pub use crate::eval::shapes_report::{evaluate_images, score, score_verdicts, Report, Tally};

/// Pixels darker than this (max channel / 255) are background.
pub const MIN_VALUE: f32 = 0.3;
/// Saturation above which a pixel is a hue; below `WHITE_MAX_SATURATION` it may be white.
pub const MIN_SATURATION: f32 = 0.45;
pub const WHITE_MAX_SATURATION: f32 = 0.25;
/// Unsaturated pixels must be at least this bright to count as white.
pub const WHITE_MIN_VALUE: f32 = 0.55;
/// A saturated pixel farther than this (degrees) from every palette hue is left unlabeled.
pub const MAX_HUE_DISTANCE: f32 = 25.0;
/// Blobs under this fraction of the image area are ignored (the smallest object covers ~1.3 %).
pub const MIN_BLOB_FRACTION: f32 = 0.004;
/// Blobs whose fitted radius (fraction of the image side) is under this are small: midway between
/// the generator's largest small radius (0.10) and smallest large one (0.14).
pub const SIZE_THRESHOLD: f32 = 0.12;
/// Neighbors (of 8) that must agree on another label to relabel a pixel.
pub const SMOOTH_VOTES: usize = 6;
/// Least centroid distance, as a fraction of the image side, along a relation's direction.
pub const MIN_RELATION_OFFSET: f32 = 0.02;

/// Hue in degrees [0, 360), saturation and value in [0, 1].
fn hsv(p: [u8; 3]) -> (f32, f32, f32) {
    let [r, g, b] = p.map(f32::from);
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let value = max / 255.0;
    if max <= 0.0 {
        return (0.0, 0.0, 0.0);
    }
    let saturation = (max - min) / max;
    if max == min {
        return (0.0, saturation, value);
    }
    let span = max - min;
    let hue = if max == r {
        60.0 * ((g - b) / span)
    } else if max == g {
        60.0 * ((b - r) / span) + 120.0
    } else {
        60.0 * ((r - g) / span) + 240.0
    };
    (hue.rem_euclid(360.0), saturation, value)
}

fn hue_distance(a: f32, b: f32) -> f32 {
    let d = (a - b).abs() % 360.0;
    d.min(360.0 - d)
}

/// The palette color of one pixel, or `None` for background and unreadable pixels.
pub fn classify_pixel(p: [u8; 3]) -> Option<Color> {
    let (hue, saturation, value) = hsv(p);
    if value < MIN_VALUE {
        return None;
    }
    if saturation <= WHITE_MAX_SATURATION {
        return (value >= WHITE_MIN_VALUE).then_some(Color::White);
    }
    if saturation < MIN_SATURATION {
        return None;
    }
    Color::ALL
        .into_iter()
        .filter(|c| *c != Color::White)
        .map(|c| (c, hue_distance(hue, hsv(c.rgb()).0)))
        .filter(|(_, d)| *d <= MAX_HUE_DISTANCE)
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(c, _)| c)
}

/// One connected region of a single color, with its measurements and classification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Blob {
    pub color: Color,
    pub shape: Shape,
    pub size: Size,
    /// Pixels in the region.
    pub area: usize,
    /// Inclusive pixel bounds [x0, y0, x1, y1].
    pub bbox: [u32; 4],
    /// Mean pixel position, [x, y] as fractions of the image side (pixel centers at (i + 0.5) / side).
    pub centroid: [f32; 2],
    /// Radius (as the generator defines it, fraction of the image side) of the best-fitting shape.
    pub radius: f32,
    /// Intersection over union with the upright circle, square and triangle of the blob's area and
    /// centroid; `shape` is the best of them.
    pub fits: [f32; 3],
}

/// Radius, in pixels, of the generator's `shape` whose area is `area` pixels.
fn radius_for_area(shape: Shape, area: f32) -> f32 {
    match shape {
        Shape::Circle => (area / std::f32::consts::PI).sqrt(),
        Shape::Square => area.sqrt() * 0.5 / SQUARE_HALF_SIDE,
        Shape::Triangle => (area * 0.5).sqrt(),
    }
}

/// How much of each pixel of a region the shape covers, in [0, 1], over the region's bounding box.
struct Coverage {
    x0: u32,
    y0: u32,
    width: u32,
    height: u32,
    weights: Vec<f32>,
}

impl Coverage {
    fn new(pixels: &[(u32, u32, f32)]) -> Self {
        let x0 = pixels.iter().map(|p| p.0).min().unwrap_or(0);
        let y0 = pixels.iter().map(|p| p.1).min().unwrap_or(0);
        let width = pixels.iter().map(|p| p.0).max().unwrap_or(0) - x0 + 1;
        let height = pixels.iter().map(|p| p.1).max().unwrap_or(0) - y0 + 1;
        let mut weights = vec![0.0; (width * height) as usize];
        for &(x, y, w) in pixels {
            weights[((y - y0) * width + (x - x0)) as usize] = w;
        }
        Coverage { x0, y0, width, height, weights }
    }

    fn at(&self, x: i64, y: i64) -> f32 {
        let (dx, dy) = (x - self.x0 as i64, y - self.y0 as i64);
        if dx < 0 || dy < 0 || dx >= self.width as i64 || dy >= self.height as i64 {
            0.0
        } else {
            self.weights[(dy * self.width as i64 + dx) as usize]
        }
    }
}

/// Samples per pixel side when rasterizing a template.
const TEMPLATE_SUPERSAMPLE: u32 = 4;

/// Soft intersection over union (sum of minima over sum of maxima of the two coverages) of a region
/// with the upright `shape` of the same area and centroid, both in pixels. The template is the
/// generator's own shape, so no threshold is tuned; a few stray or missing pixels on the outline
/// (noise, blur) move it little, unlike bounding-box measures; and partial coverage of edge pixels
/// keeps small circles and squares apart at 64 x 64.
fn template_fit(shape: Shape, region: &Coverage, area: f32, centroid: [f32; 2]) -> f32 {
    let r = radius_for_area(shape, area);
    // A triangle's centroid sits a third of its radius below the center of its bounding box.
    let center = match shape {
        Shape::Triangle => [centroid[0], centroid[1] - r / 3.0],
        Shape::Circle | Shape::Square => centroid,
    };
    let template = SceneObject { shape, color: Color::White, size: Size::Small, center, radius: r };
    let x_lo = (region.x0 as i64).min((center[0] - r).floor() as i64 - 1);
    let y_lo = (region.y0 as i64).min((center[1] - r).floor() as i64 - 1);
    let x_hi = ((region.x0 + region.width) as i64).max((center[0] + r).ceil() as i64 + 1);
    let y_hi = ((region.y0 + region.height) as i64).max((center[1] + r).ceil() as i64 + 1);
    let ss = TEMPLATE_SUPERSAMPLE;
    let (mut both, mut either) = (0f32, 0f32);
    for y in y_lo..y_hi {
        for x in x_lo..x_hi {
            let mut inside = 0u32;
            for sy in 0..ss {
                for sx in 0..ss {
                    let px = x as f32 + (sx as f32 + 0.5) / ss as f32;
                    let py = y as f32 + (sy as f32 + 0.5) / ss as f32;
                    inside += u32::from(template.contains(px, py));
                }
            }
            let t = inside as f32 / (ss * ss) as f32;
            let w = region.at(x, y);
            both += t.min(w);
            either += t.max(w);
        }
    }
    if either > 0.0 {
        both / either
    } else {
        0.0
    }
}

/// Measures and classifies one component given its pixels and how much of each it covers.
fn measure(color: Color, pixels: &[(u32, u32, f32)], side: u32) -> Blob {
    let region = Coverage::new(pixels);
    let area: f32 = pixels.iter().map(|p| p.2).sum::<f32>().max(f32::MIN_POSITIVE);
    let cx = pixels.iter().map(|p| (p.0 as f32 + 0.5) * p.2).sum::<f32>() / area;
    let cy = pixels.iter().map(|p| (p.1 as f32 + 0.5) * p.2).sum::<f32>() / area;
    let fits = Shape::ALL.map(|shape| template_fit(shape, &region, area, [cx, cy]));
    let best = (0..3).max_by(|&a, &b| fits[a].total_cmp(&fits[b])).unwrap_or(0);
    let shape = Shape::ALL[best];
    let side = side as f32;
    let radius = radius_for_area(shape, area) / side;
    Blob {
        color,
        shape,
        size: if radius < SIZE_THRESHOLD { Size::Small } else { Size::Large },
        area: pixels.len(),
        bbox: [region.x0, region.y0, region.x0 + region.width - 1, region.y0 + region.height - 1],
        centroid: [cx / side, cy / side],
        radius,
        fits,
    }
}

/// Cleans the color labels: a pixel whose 8 neighbors are at least `SMOOTH_VOTES` of one other label
/// (background included) takes that label. This fills pinholes and removes specks of noise while
/// leaving outlines, corners and triangle tips (at most 5 differing neighbors) as they are.
fn smooth_labels(labels: &[Option<Color>], w: usize, h: usize) -> Vec<Option<Color>> {
    let mut out = labels.to_vec();
    for y in 0..h {
        for x in 0..w {
            let mut votes: Vec<(Option<Color>, usize)> = Vec::with_capacity(8);
            for (dx, dy) in [(-1i64, -1i64), (0, -1), (1, -1), (-1, 0), (1, 0), (-1, 1), (0, 1), (1, 1)] {
                let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                // Outside the image counts as background.
                let label = if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                    None
                } else {
                    labels[ny as usize * w + nx as usize]
                };
                match votes.iter_mut().find(|(l, _)| *l == label) {
                    Some((_, n)) => *n += 1,
                    None => votes.push((label, 1)),
                }
            }
            let own = labels[y * w + x];
            if let Some((label, _)) = votes.iter().find(|(l, n)| *l != own && *n >= SMOOTH_VOTES) {
                out[y * w + x] = *label;
            }
        }
    }
    out
}

/// How much of a pixel labeled `color` the shape covers: its brightness over the palette color's
/// (anti-aliased edges are the color blended with black). Pixels that smoothing relabeled count whole.
fn coverage_of(pixel: [u8; 3], color: Color, raw_label: Option<Color>) -> f32 {
    if raw_label != Some(color) {
        return 1.0;
    }
    let value = pixel.into_iter().max().unwrap_or(0) as f32;
    let full = color.rgb().into_iter().max().unwrap_or(255).max(1) as f32;
    (value / full).min(1.0)
}

/// Segments a picture into classified blobs, largest first. Non-square images are measured against
/// their longer side.
pub fn find_blobs(image: &RgbImage) -> Vec<Blob> {
    let (w, h) = image.dimensions();
    let side = w.max(h);
    let raw: Vec<Option<Color>> = image.pixels().map(|p| classify_pixel(p.0)).collect();
    let labels = smooth_labels(&raw, w as usize, h as usize);
    let min_area = ((MIN_BLOB_FRACTION * (side as f32) * (side as f32)).ceil() as usize).max(2);
    let mut seen = vec![false; labels.len()];
    let mut blobs = Vec::new();
    let mut stack = Vec::new();
    for start in 0..labels.len() {
        let Some(color) = labels[start] else { continue };
        if seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let mut pixels = Vec::new();
        while let Some(i) = stack.pop() {
            let (x, y) = ((i % w as usize) as i64, (i / w as usize) as i64);
            pixels.push((x as u32, y as u32, coverage_of(image.get_pixel(x as u32, y as u32).0, color, raw[i])));
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (nx, ny) = (x + dx, y + dy);
                    if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                        continue;
                    }
                    let j = ny as usize * w as usize + nx as usize;
                    if !seen[j] && labels[j] == Some(color) {
                        seen[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        if pixels.len() >= min_area {
            blobs.push(measure(color, &pixels, side));
        }
    }
    blobs.sort_by(|a, b| b.area.cmp(&a.area));
    blobs
}

/// What a check looks for in one blob; `None` fields match anything.
#[derive(Debug, Clone, Copy)]
struct Want {
    shape: Option<Shape>,
    color: Option<Color>,
    size: Option<Size>,
}

impl Want {
    fn full(spec: &ObjectSpec) -> Self {
        Want { shape: Some(spec.shape), color: spec.color, size: spec.size }
    }

    fn matches(&self, blob: &Blob) -> bool {
        self.shape.is_none_or(|s| s == blob.shape)
            && self.color.is_none_or(|c| c == blob.color)
            && self.size.is_none_or(|s| s == blob.size)
    }
}

/// Whether every want can be given its own blob (backtracking; prompts name at most three objects).
fn assign(wants: &[Want], blobs: &[Blob], used: &mut Vec<bool>) -> bool {
    let Some((want, rest)) = wants.split_first() else { return true };
    for (i, blob) in blobs.iter().enumerate() {
        if !used[i] && want.matches(blob) {
            used[i] = true;
            if assign(rest, blobs, used) {
                return true;
            }
            used[i] = false;
        }
    }
    false
}

fn all_present(wants: &[Want], blobs: &[Blob]) -> bool {
    assign(wants, blobs, &mut vec![false; blobs.len()])
}

/// Whether a subject centroid stands in `relation` to an object centroid: inside the 90-degree cone
/// around the relation's direction, and at least `MIN_RELATION_OFFSET` along it.
pub fn relation_holds(subject: [f32; 2], relation: Relation, object: [f32; 2]) -> bool {
    let (along, across) = crate::data::shapes::axis_offsets(subject, relation, object);
    along >= MIN_RELATION_OFFSET && across.abs() <= along
}

/// The outcome of one check on one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckResult {
    /// "object", "colors", "shapes", "binding", "objects", "relation" or "count".
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

/// Every check of one prompt on one image; the image passes when all checks pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub prompt: String,
    pub category: Category,
    pub passed: bool,
    pub checks: Vec<CheckResult>,
    pub blobs: Vec<Blob>,
    /// Blobs beyond the objects the prompt names (its count, for counting prompts). The checks do
    /// not fail a picture for them (counting aside); the report's `exact` row does.
    pub extra_objects: usize,
}

fn describe(blobs: &[Blob]) -> String {
    if blobs.is_empty() {
        return "found nothing".into();
    }
    let names: Vec<String> =
        blobs.iter().map(|b| format!("{} {} {}", b.size.word(), b.color.word(), b.shape.word())).collect();
    format!("found {}", names.join(", "))
}

fn result(name: &str, passed: bool, detail: String) -> CheckResult {
    CheckResult { name: name.into(), passed, detail }
}

/// Checks one image against one parsed prompt. The checks per category:
/// single: `object`; binding: `colors`, `shapes` (each named color / shape present, whatever it is
/// bound to) and `binding` (each named object present with its own color, shape and size);
/// relation: `objects` and `relation`; counting: `count` (exactly that many matching blobs).
pub fn check_image(image: &RgbImage, prompt: &Prompt) -> Verdict {
    let blobs = find_blobs(image);
    let found = describe(&blobs);
    let checks = match prompt {
        Prompt::Objects(specs) if specs.len() <= 1 => {
            let wants: Vec<Want> = specs.iter().map(Want::full).collect();
            vec![result("object", all_present(&wants, &blobs), found)]
        }
        Prompt::Objects(specs) => {
            let colors: Vec<Want> = specs.iter().map(|s| Want { shape: None, color: s.color, size: None }).collect();
            let shapes: Vec<Want> =
                specs.iter().map(|s| Want { shape: Some(s.shape), color: None, size: None }).collect();
            let full: Vec<Want> = specs.iter().map(Want::full).collect();
            vec![
                result("colors", all_present(&colors, &blobs), found.clone()),
                result("shapes", all_present(&shapes, &blobs), found.clone()),
                result("binding", all_present(&full, &blobs), found),
            ]
        }
        Prompt::Relation { subject, relation, object } => {
            let (s, o) = (Want::full(subject), Want::full(object));
            let present = all_present(&[s, o], &blobs);
            let mut related = false;
            for (i, a) in blobs.iter().enumerate() {
                for (j, b) in blobs.iter().enumerate() {
                    if i != j && s.matches(a) && o.matches(b) && relation_holds(a.centroid, *relation, b.centroid) {
                        related = true;
                    }
                }
            }
            vec![result("objects", present, found.clone()), result("relation", related, found)]
        }
        Prompt::Count { count, spec } => {
            let want = Want::full(spec);
            let n = blobs.iter().filter(|b| want.matches(b)).count();
            vec![result("count", n == *count, format!("counted {n} of {count}; {found}"))]
        }
    };
    let named = match prompt {
        Prompt::Objects(specs) => specs.len(),
        Prompt::Relation { .. } => 2,
        Prompt::Count { count, .. } => *count,
    };
    Verdict {
        prompt: prompt.caption(),
        category: prompt.category(),
        passed: checks.iter().all(|c| c.passed),
        checks,
        extra_objects: blobs.len().saturating_sub(named),
        blobs,
    }
}
