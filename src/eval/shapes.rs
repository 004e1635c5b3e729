//! Scorer of the shapes benchmark: reads a picture back into colored blobs and checks a parsed
//! caption against them (object present, attribute binding, spatial relation, count).
//!
//! 1. Segment by color. A pixel is background when dark (value < `MIN_VALUE`); otherwise it takes
//!    the palette color of nearest hue (within `MAX_HUE_DISTANCE`) when saturated, white when
//!    unsaturated and bright, and nothing in between. Hue and saturation do not change when an edge
//!    pixel is blended with the black background, so anti-aliased edges fall into the right color or
//!    into the background, never into a third color.
//! 2. Connected components of each color (8-neighborhood); components smaller than
//!    `MIN_BLOB_FRACTION` of the image are noise and dropped.
//! 3. Classify each blob. Triangles point up, so the top half of their bounding box holds a third
//!    of what the bottom half does, and they fill half of it; circles fill pi / 4 of it and squares
//!    all of it. Size from the longer side of the bounding box.
//! 4. Check the prompt: objects match distinct blobs; a relation holds when the subject's centroid
//!    lies in the 90-degree cone of the relation's direction seen from the object's centroid
//!    (at least `MIN_RELATION_OFFSET` away); a count is exact among blobs of that color and shape.

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::data::prompt::{Category, Color, ObjectSpec, Prompt, Relation, Shape, Size};

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
/// Bounding boxes whose longer side is under this fraction of the image side are small.
pub const SIZE_THRESHOLD: f32 = 0.224;
/// A blob whose top half holds less than this fraction of its bottom half is a triangle.
pub const TRIANGLE_MAX_TOP_BOTTOM: f32 = 0.6;
/// Bounding-box fill ratios separating triangle (1/2) / circle (pi/4) / square (1).
pub const TRIANGLE_MAX_FILL: f32 = 0.64;
pub const SQUARE_MIN_FILL: f32 = 0.92;
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
    /// area / bounding-box area.
    pub fill: f32,
    /// Pixels in the top half of the bounding box over pixels in the bottom half.
    pub top_bottom: f32,
}

/// Shape from the bounding-box fill ratio and the top / bottom balance.
pub fn classify_shape(fill: f32, top_bottom: f32) -> Shape {
    if top_bottom < TRIANGLE_MAX_TOP_BOTTOM || fill < TRIANGLE_MAX_FILL {
        Shape::Triangle
    } else if fill >= SQUARE_MIN_FILL {
        Shape::Square
    } else {
        Shape::Circle
    }
}

/// Measures and classifies one component given its pixel coordinates.
fn measure(color: Color, pixels: &[(u32, u32)], side: u32) -> Blob {
    let x0 = pixels.iter().map(|p| p.0).min().unwrap_or(0);
    let x1 = pixels.iter().map(|p| p.0).max().unwrap_or(0);
    let y0 = pixels.iter().map(|p| p.1).min().unwrap_or(0);
    let y1 = pixels.iter().map(|p| p.1).max().unwrap_or(0);
    let width = (x1 - x0 + 1) as f32;
    let height = (y1 - y0 + 1) as f32;
    let area = pixels.len();
    let (mut sum_x, mut sum_y, mut top, mut bottom) = (0f64, 0f64, 0f32, 0f32);
    for &(x, y) in pixels {
        sum_x += x as f64 + 0.5;
        sum_y += y as f64 + 0.5;
        // Row position within the box, twice over so the middle row of an odd box is exactly equal.
        let twice = 2 * (y - y0) + 1;
        let rows = y1 - y0 + 1;
        match twice.cmp(&rows) {
            std::cmp::Ordering::Less => top += 1.0,
            std::cmp::Ordering::Greater => bottom += 1.0,
            std::cmp::Ordering::Equal => {
                top += 0.5;
                bottom += 0.5;
            }
        }
    }
    let fill = area as f32 / (width * height);
    let top_bottom = if bottom > 0.0 { top / bottom } else { 1.0 };
    let side_f = side as f32;
    let extent = width.max(height) / side_f;
    Blob {
        color,
        shape: classify_shape(fill, top_bottom),
        size: if extent < SIZE_THRESHOLD { Size::Small } else { Size::Large },
        area,
        bbox: [x0, y0, x1, y1],
        centroid: [(sum_x / area as f64) as f32 / side_f, (sum_y / area as f64) as f32 / side_f],
        fill,
        top_bottom,
    }
}

/// Segments a picture into classified blobs, largest first. Non-square images are measured against
/// their longer side.
pub fn find_blobs(image: &RgbImage) -> Vec<Blob> {
    let (w, h) = image.dimensions();
    let side = w.max(h);
    let labels: Vec<Option<Color>> = image.pixels().map(|p| classify_pixel(p.0)).collect();
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
            pixels.push((x as u32, y as u32));
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
}

fn describe(blobs: &[Blob]) -> String {
    if blobs.is_empty() {
        return "found nothing".into();
    }
    let names: Vec<String> = blobs
        .iter()
        .map(|b| format!("{} {} {}", b.size.word(), b.color.word(), b.shape.word()))
        .collect();
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
            let colors: Vec<Want> =
                specs.iter().map(|s| Want { shape: None, color: s.color, size: None }).collect();
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
    Verdict {
        prompt: prompt.caption(),
        category: prompt.category(),
        passed: checks.iter().all(|c| c.passed),
        checks,
        blobs,
    }
}
