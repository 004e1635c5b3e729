//! Procedural pictures of solid shapes with captions: the training data of visgen's tiny default
//! model and the ground truth of the compositional benchmark in `eval::shapes`.
//!
//! A `Scene` (one to three colored shapes on a black background, plus how its caption is phrased) is
//! the truth. `render` draws it deterministically, `caption` phrases it in the grammar of
//! `data::prompt`, and `parse_prompt` reads a caption back into a `Prompt`. Coordinates are fractions
//! of the image side, x to the right and y downwards, so one scene renders at any resolution.
//!
//! Black is the background because blending an edge pixel with black keeps its hue and saturation:
//! the scorer segments anti-aliased renders by hue with no halo of in-between colors.

use image::{Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

pub use crate::data::prompt::{
    parse_prompt, token_ids, vocabulary, words, Category, Color, ObjectSpec, Prompt, Relation, Shape, Size, VOCABULARY,
};

/// Radius ranges (fraction of the image side) of the two sizes. The gap between them (largest small
/// bounding box 0.20, smallest large one 0.248) is what lets the scorer tell the sizes apart.
pub const SMALL_RADIUS: (f32, f32) = (0.08, 0.10);
pub const LARGE_RADIUS: (f32, f32) = (0.14, 0.17);
/// A square's half side per unit radius: the square has the area of the circle of that radius.
pub const SQUARE_HALF_SIDE: f32 = 0.886;
/// Least empty space between the bounding boxes of two objects, and between an object and the border.
pub const OBJECT_GAP: f32 = 0.04;
pub const BORDER_GAP: f32 = 0.03;
/// Least empty space between two related objects along the relation's axis; the distance across
/// that axis is at most `RELATION_SLANT` times the distance along it, so "above" never looks "left of".
pub const RELATION_GAP: f32 = 0.05;
pub const RELATION_SLANT: f32 = 0.5;
pub const BACKGROUND: [u8; 3] = [0, 0, 0];

impl Color {
    /// The color drawn for this word. Hues sit at least 54 degrees apart (red 0, yellow 54, green 131,
    /// blue 225, purple 279), white is unsaturated.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Color::Red => [230, 40, 40],
            Color::Green => [40, 200, 70],
            Color::Blue => [40, 90, 240],
            Color::Yellow => [235, 215, 40],
            Color::Purple => [170, 60, 230],
            Color::White => [235, 235, 235],
        }
    }
}

/// One drawn shape. `radius` is the half width of the shape's bounding box for circles and triangles;
/// squares are a little smaller (`SQUARE_HALF_SIDE`) so that they have the circle's area.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SceneObject {
    pub shape: Shape,
    pub color: Color,
    pub size: Size,
    /// Center of the bounding box, [x, y] as fractions of the image side.
    pub center: [f32; 2],
    pub radius: f32,
}

impl SceneObject {
    /// Half the side of the object's bounding box.
    pub fn half_extent(&self) -> f32 {
        match self.shape {
            Shape::Square => self.radius * SQUARE_HALF_SIDE,
            Shape::Circle | Shape::Triangle => self.radius,
        }
    }

    /// Whether the point (x, y) lies inside the shape. Triangles point up: apex at the top middle of
    /// the bounding box, base along its bottom edge.
    pub fn contains(&self, x: f32, y: f32) -> bool {
        let dx = x - self.center[0];
        let dy = y - self.center[1];
        let r = self.radius;
        match self.shape {
            Shape::Circle => dx * dx + dy * dy <= r * r,
            Shape::Square => dx.abs() <= r * SQUARE_HALF_SIDE && dy.abs() <= r * SQUARE_HALF_SIDE,
            Shape::Triangle => dy <= r && dx.abs() <= (dy + r) * 0.5,
        }
    }
}

/// How the objects of a scene are phrased.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// "a red circle and a blue square": each object named once.
    List,
    /// "a red circle above a blue square": objects[0] stands in this relation to objects[1].
    Relation(Relation),
    /// "two red circles": all objects share shape and color.
    Count,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub objects: Vec<SceneObject>,
    pub layout: Layout,
    /// Whether the caption names the sizes ("a small red circle").
    pub size_words: bool,
}

impl Scene {
    /// The structured prompt whose caption describes this scene.
    pub fn prompt(&self) -> Prompt {
        let spec = |o: &SceneObject| ObjectSpec {
            shape: o.shape,
            color: Some(o.color),
            size: self.size_words.then_some(o.size),
        };
        match self.layout {
            Layout::List => Prompt::Objects(self.objects.iter().map(spec).collect()),
            Layout::Relation(relation) => {
                Prompt::Relation { subject: spec(&self.objects[0]), relation, object: spec(&self.objects[1]) }
            }
            Layout::Count => Prompt::Count { count: self.objects.len(), spec: spec(&self.objects[0]) },
        }
    }

    pub fn category(&self) -> Category {
        self.prompt().category()
    }
}

/// The scene's caption, e.g. "a small red square on the left of a large blue circle".
pub fn caption(scene: &Scene) -> String {
    scene.prompt().caption()
}

/// Mix of scene kinds and phrasing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenConfig {
    /// Relative weights of single, binding, relation and counting scenes.
    pub category_weights: [f32; 4],
    /// Chance that a caption names sizes.
    pub size_word_prob: f64,
    /// Chance that a binding or counting scene has three objects rather than two.
    pub three_object_prob: f64,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig { category_weights: [1.0, 1.0, 1.0, 1.0], size_word_prob: 0.5, three_object_prob: 0.4 }
    }
}

/// A random scene whose category is drawn from `config.category_weights`.
pub fn sample_scene<R: Rng + ?Sized>(rng: &mut R, config: &GenConfig) -> Scene {
    let total: f32 = config.category_weights.iter().map(|w| w.max(0.0)).sum();
    let mut pick = if total > 0.0 { rng.random_range(0.0..total) } else { 0.0 };
    let mut category = Category::Single;
    for (c, w) in Category::ALL.into_iter().zip(config.category_weights) {
        let w = w.max(0.0);
        if pick < w {
            category = c;
            break;
        }
        pick -= w;
    }
    sample_scene_of(rng, category, config)
}

/// A random scene of the given category.
pub fn sample_scene_of<R: Rng + ?Sized>(rng: &mut R, category: Category, config: &GenConfig) -> Scene {
    let size_words = rng.random_bool(config.size_word_prob.clamp(0.0, 1.0));
    let three = rng.random_bool(config.three_object_prob.clamp(0.0, 1.0));
    let mut colors = Color::ALL;
    colors.shuffle(rng);
    let mut shapes = Shape::ALL;
    shapes.shuffle(rng);
    // (shape, color) of every object; the relation pair differs in shape, color or both.
    let (kinds, layout): (Vec<(Shape, Color)>, Layout) = match category {
        Category::Single => (vec![(shapes[0], colors[0])], Layout::List),
        Category::Binding => {
            let n = if three { 3 } else { 2 };
            ((0..n).map(|i| (shapes[i], colors[i])).collect(), Layout::List)
        }
        Category::Relation => {
            let relation = *Relation::ALL.choose(rng).unwrap_or(&Relation::LeftOf);
            let second = match rng.random_range(0..3) {
                0 => (shapes[1], colors[0]),
                1 => (shapes[0], colors[1]),
                _ => (shapes[1], colors[1]),
            };
            (vec![(shapes[0], colors[0]), second], Layout::Relation(relation))
        }
        Category::Counting => {
            let n = if three { 3 } else { 2 };
            (vec![(shapes[0], colors[0]); n], Layout::Count)
        }
    };
    // Counted objects named with a size word all have that size.
    let shared_size = if rng.random_bool(0.5) { Size::Small } else { Size::Large };
    let mut objects: Vec<SceneObject> = kinds
        .into_iter()
        .map(|(shape, color)| {
            let size = if layout == Layout::Count && size_words {
                shared_size
            } else if rng.random_bool(0.5) {
                Size::Small
            } else {
                Size::Large
            };
            let (lo, hi) = match size {
                Size::Small => SMALL_RADIUS,
                Size::Large => LARGE_RADIUS,
            };
            SceneObject { shape, color, size, center: [0.5, 0.5], radius: rng.random_range(lo..hi) }
        })
        .collect();
    let relation = match layout {
        Layout::Relation(r) => Some(r),
        _ => None,
    };
    place(rng, &mut objects, relation);
    Scene { objects, layout, size_words }
}

/// Whether two objects' bounding boxes are at least `OBJECT_GAP` apart.
fn apart(a: &SceneObject, b: &SceneObject) -> bool {
    let reach = a.half_extent() + b.half_extent() + OBJECT_GAP;
    (a.center[0] - b.center[0]).abs() >= reach || (a.center[1] - b.center[1]).abs() >= reach
}

/// Whether `subject` stands in `relation` to `object` with the generator's margins.
pub fn relation_holds_with_margin(subject: &SceneObject, relation: Relation, object: &SceneObject) -> bool {
    let (along, across) = axis_offsets(subject.center, relation, object.center);
    along - subject.half_extent() - object.half_extent() >= RELATION_GAP && across.abs() <= RELATION_SLANT * along
}

/// Distance from subject to object along the relation's direction (positive when the relation
/// holds) and across it.
pub fn axis_offsets(subject: [f32; 2], relation: Relation, object: [f32; 2]) -> (f32, f32) {
    let dx = object[0] - subject[0];
    let dy = object[1] - subject[1];
    match relation {
        Relation::LeftOf => (dx, dy),
        Relation::RightOf => (-dx, dy),
        Relation::Above => (dy, dx),
        Relation::Below => (-dy, dx),
    }
}

/// Places the objects at random inside the frame, apart from each other, with objects[0] in
/// `relation` to objects[1] when there is one. Rejection sampling; a fixed layout that always
/// satisfies the constraints is the (practically unreachable) fallback.
fn place<R: Rng + ?Sized>(rng: &mut R, objects: &mut [SceneObject], relation: Option<Relation>) {
    const ATTEMPTS: usize = 2000;
    for _ in 0..ATTEMPTS {
        for i in 0..objects.len() {
            let lo = objects[i].half_extent() + BORDER_GAP;
            objects[i].center = [rng.random_range(lo..1.0 - lo), rng.random_range(lo..1.0 - lo)];
        }
        let all_apart = (0..objects.len()).all(|i| (0..i).all(|j| apart(&objects[i], &objects[j])));
        let related = relation.is_none_or(|r| relation_holds_with_margin(&objects[0], r, &objects[1]));
        if all_apart && related {
            return;
        }
    }
    let fallback: [[f32; 2]; 3] = match relation {
        Some(Relation::LeftOf) => [[0.25, 0.5], [0.75, 0.5], [0.5, 0.5]],
        Some(Relation::RightOf) => [[0.75, 0.5], [0.25, 0.5], [0.5, 0.5]],
        Some(Relation::Above) => [[0.5, 0.25], [0.5, 0.75], [0.5, 0.5]],
        Some(Relation::Below) => [[0.5, 0.75], [0.5, 0.25], [0.5, 0.5]],
        None => [[0.25, 0.25], [0.75, 0.75], [0.75, 0.25]],
    };
    for (object, center) in objects.iter_mut().zip(fallback) {
        object.center = center;
        object.radius = object.radius.min(SMALL_RADIUS.1);
    }
}

/// Samples per pixel side used by `render` for anti-aliasing.
pub const DEFAULT_SUPERSAMPLE: u32 = 4;

/// Draws the scene on a `size` x `size` black image, anti-aliased with 4 x 4 samples per pixel.
pub fn render(scene: &Scene, size: u32) -> RgbImage {
    render_with(scene, size, DEFAULT_SUPERSAMPLE)
}

/// Draws the scene with `supersample` x `supersample` samples per pixel (1: hard edges). Objects are
/// composited in order, each over what is below it.
pub fn render_with(scene: &Scene, size: u32, supersample: u32) -> RgbImage {
    let ss = supersample.max(1);
    let side = size as f32;
    let n = size as usize;
    let mut canvas: Vec<[f32; 3]> = vec![BACKGROUND.map(f32::from); n * n];
    for object in &scene.objects {
        let rgb = object.color.rgb().map(f32::from);
        let reach = object.half_extent();
        let first = |c: f32| (((c - reach) * side).floor().max(0.0)) as usize;
        let last = |c: f32| (((c + reach) * side).ceil().min(side)) as usize;
        for py in first(object.center[1])..last(object.center[1]) {
            for px in first(object.center[0])..last(object.center[0]) {
                let mut inside = 0u32;
                for sy in 0..ss {
                    for sx in 0..ss {
                        let x = (px as f32 + (sx as f32 + 0.5) / ss as f32) / side;
                        let y = (py as f32 + (sy as f32 + 0.5) / ss as f32) / side;
                        inside += u32::from(object.contains(x, y));
                    }
                }
                let coverage = inside as f32 / (ss * ss) as f32;
                let pixel = &mut canvas[py * n + px];
                for c in 0..3 {
                    pixel[c] = pixel[c] * (1.0 - coverage) + rgb[c] * coverage;
                }
            }
        }
    }
    RgbImage::from_fn(size, size, |x, y| {
        let p = canvas[y as usize * n + x as usize];
        Rgb(p.map(|v| v.round().clamp(0.0, 255.0) as u8))
    })
}

/// A well-mixed 64-bit seed for item `index` of a stream seeded with `seed` (SplitMix64 finalizer),
/// so item i of a data set does not depend on how many items came before it.
fn item_seed(seed: u64, index: u64) -> u64 {
    let mut z = seed ^ index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Scene number `index` of the training stream seeded with `seed`. Reproducible across runs with
/// the same `rand` version (StdRng's algorithm may change between major versions of `rand`).
pub fn scene_at(seed: u64, index: u64, config: &GenConfig) -> Scene {
    let mut rng = StdRng::seed_from_u64(item_seed(seed, index));
    sample_scene(&mut rng, config)
}

/// The first `n` scenes of the training stream seeded with `seed`.
pub fn scenes(seed: u64, n: usize, config: GenConfig) -> impl Iterator<Item = Scene> {
    (0..n as u64).map(move |i| scene_at(seed, i, &config))
}

/// `n` rendered training pairs (image, caption) at `size` x `size`, with the default mix of scenes.
pub fn dataset(seed: u64, n: usize, size: u32) -> impl Iterator<Item = (RgbImage, String)> {
    dataset_with(seed, n, size, GenConfig::default())
}

/// `n` rendered training pairs (image, caption) at `size` x `size`, with the given mix of scenes.
pub fn dataset_with(seed: u64, n: usize, size: u32, config: GenConfig) -> impl Iterator<Item = (RgbImage, String)> {
    scenes(seed, n, config).map(move |scene| (render(&scene, size), caption(&scene)))
}

/// Keeps benchmark prompts apart from the training stream of the same seed.
const BENCHMARK_SALT: u64 = 0x6265_6e63_685f_7631;

/// The scenes behind `prompt_set(seed, n)`: categories in turn (single, binding, relation,
/// counting, single, ...), so every category gets n / 4 prompts.
pub fn benchmark_scenes(seed: u64, n: usize) -> Vec<Scene> {
    let config = GenConfig::default();
    (0..n)
        .map(|i| {
            let mut rng = StdRng::seed_from_u64(item_seed(seed ^ BENCHMARK_SALT, i as u64));
            sample_scene_of(&mut rng, Category::ALL[i % Category::ALL.len()], &config)
        })
        .collect()
}

/// Benchmark prompts with their categories, balanced over the four categories.
pub fn prompt_set(seed: u64, n: usize) -> Vec<(String, Category)> {
    benchmark_scenes(seed, n).iter().map(|s| (caption(s), s.category())).collect()
}
