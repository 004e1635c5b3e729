//! The shapes data generator and its benchmark scorer: reproducibility, the caption grammar, the
//! rendered geometry against closed-form areas, the scorer on true and on deliberately wrong pictures.

use image::{Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use visgen::data::shapes::{
    benchmark_scenes, caption, dataset, parse_prompt, prompt_set, render, render_with, sample_scene, sample_scene_of,
    scene_at, scenes, token_ids, Category, Color, GenConfig, Layout, ObjectSpec, Prompt, Relation, Scene, SceneObject,
    Shape, Size, LARGE_RADIUS, SMALL_RADIUS, VOCABULARY,
};
use visgen::eval::shapes::{check_image, evaluate_images, find_blobs, score, Report};
use visgen::Error;

fn object(shape: Shape, color: Color, size: Size, center: [f32; 2], radius: f32) -> SceneObject {
    SceneObject { shape, color, size, center, radius }
}

fn spec(shape: Shape, color: Option<Color>, size: Option<Size>) -> ObjectSpec {
    ObjectSpec { shape, color, size }
}

/// Scores rendered scenes against prompts; `picture` maps each scene to the picture to score.
fn score_scenes(scenes: &[Scene], prompts: &[Prompt], picture: impl Fn(usize, &Scene) -> RgbImage) -> Report {
    let images: Vec<RgbImage> = scenes.iter().enumerate().map(|(i, s)| picture(i, s)).collect();
    score(images.iter().zip(prompts))
}

fn accuracy(report: &Report, category: Category) -> f64 {
    report.category(category).map(|t| t.accuracy).unwrap_or(f64::NAN)
}

fn check_accuracy(report: &Report, name: &str) -> f64 {
    report.check(name).map(|t| t.accuracy).unwrap_or(f64::NAN)
}

#[test]
fn generator_is_reproducible() {
    let first: Vec<(RgbImage, String)> = dataset(7, 24, 64).collect();
    let again: Vec<(RgbImage, String)> = dataset(7, 24, 64).collect();
    assert_eq!(first.len(), 24);
    for ((a, ca), (b, cb)) in first.iter().zip(&again) {
        assert_eq!(ca, cb);
        assert_eq!(a.as_raw(), b.as_raw());
    }
    // Another seed gives other pictures.
    let other: Vec<(RgbImage, String)> = dataset(8, 24, 64).collect();
    let same = first.iter().zip(&other).filter(|(a, b)| a.0.as_raw() == b.0.as_raw()).count();
    assert!(same < 3, "{same} of 24 images equal across seeds");
    // Item i does not depend on the items before it.
    let config = GenConfig::default();
    let all: Vec<Scene> = scenes(7, 10, config.clone()).collect();
    assert_eq!(all[9], scene_at(7, 9, &config));
    // Benchmark prompts too.
    assert_eq!(prompt_set(3, 40), prompt_set(3, 40));
    assert_ne!(prompt_set(3, 40), prompt_set(4, 40));
}

#[test]
fn captions_of_hand_built_scenes() {
    let relation = Scene {
        objects: vec![
            object(Shape::Square, Color::Red, Size::Small, [0.2, 0.5], 0.09),
            object(Shape::Circle, Color::Blue, Size::Large, [0.7, 0.5], 0.15),
        ],
        layout: Layout::Relation(Relation::LeftOf),
        size_words: true,
    };
    assert_eq!(caption(&relation), "a small red square on the left of a large blue circle");
    let count = Scene {
        objects: vec![object(Shape::Triangle, Color::Blue, Size::Small, [0.2, 0.2], 0.09); 3],
        layout: Layout::Count,
        size_words: false,
    };
    assert_eq!(caption(&count), "three blue triangles");
    let list = Scene {
        objects: vec![
            object(Shape::Circle, Color::Red, Size::Small, [0.2, 0.2], 0.09),
            object(Shape::Triangle, Color::Yellow, Size::Large, [0.7, 0.7], 0.15),
        ],
        layout: Layout::List,
        size_words: false,
    };
    assert_eq!(caption(&list), "a red circle and a yellow triangle");
}

#[test]
fn hand_written_prompts_parse() {
    let red_circle = spec(Shape::Circle, Some(Color::Red), None);
    assert_eq!(parse_prompt("a red circle").unwrap(), Prompt::Objects(vec![red_circle]));
    assert_eq!(
        parse_prompt("a small red square on the left of a large blue circle").unwrap(),
        Prompt::Relation {
            subject: spec(Shape::Square, Some(Color::Red), Some(Size::Small)),
            relation: Relation::LeftOf,
            object: spec(Shape::Circle, Some(Color::Blue), Some(Size::Large)),
        }
    );
    assert_eq!(
        parse_prompt("A Blue Square above a yellow triangle.").unwrap(),
        Prompt::Relation {
            subject: spec(Shape::Square, Some(Color::Blue), None),
            relation: Relation::Above,
            object: spec(Shape::Triangle, Some(Color::Yellow), None),
        }
    );
    assert_eq!(parse_prompt("a red circle below a green square").unwrap().category(), Category::Relation);
    assert_eq!(
        parse_prompt("two green circles").unwrap(),
        Prompt::Count { count: 2, spec: spec(Shape::Circle, Some(Color::Green), None) }
    );
    assert_eq!(
        parse_prompt("three small triangles").unwrap(),
        Prompt::Count { count: 3, spec: spec(Shape::Triangle, None, Some(Size::Small)) }
    );
    assert_eq!(
        parse_prompt("a circle, a white square and a purple triangle").unwrap_or(Prompt::Objects(vec![])),
        Prompt::Objects(vec![])
    );
    assert_eq!(
        parse_prompt("a circle and a white square and a purple triangle").unwrap(),
        Prompt::Objects(vec![
            spec(Shape::Circle, None, None),
            spec(Shape::Square, Some(Color::White), None),
            spec(Shape::Triangle, Some(Color::Purple), None),
        ])
    );
    // Word ids are positions in VOCABULARY, which never reorders.
    assert_eq!(token_ids("A red circle").unwrap(), vec![0, 5, 11]);
    assert_eq!(token_ids("three purple triangles").unwrap(), vec![2, 9, 16]);
}

#[test]
fn out_of_vocabulary_and_ungrammatical_prompts_are_usage_errors() {
    for (text, needle) in [("a red hexagon", "hexagon"), ("four red circles", "four"), ("a crimson circle", "crimson")]
    {
        match parse_prompt(text) {
            Err(Error::Usage(msg)) => {
                assert!(msg.contains(needle), "{msg}");
                for word in VOCABULARY {
                    assert!(msg.contains(word), "vocabulary word `{word}` missing from: {msg}");
                }
            }
            other => panic!("`{text}` gave {other:?}"),
        }
        assert!(matches!(token_ids(text), Err(Error::Usage(_))));
    }
    for text in [
        "",
        "red circle",
        "a red",
        "a red circle and",
        "a red circle on the of a blue square",
        "two red circle",
        "a red circles",
        "a red circle a blue square",
        "a red circle and a blue square and a green triangle and a white circle",
        "a red circle above",
    ] {
        assert!(matches!(parse_prompt(text), Err(Error::Usage(_))), "`{text}` parsed");
    }
}

#[test]
fn generated_captions_parse_back_to_their_scene() {
    let config = GenConfig::default();
    let mut rng = StdRng::seed_from_u64(21);
    for _ in 0..1000 {
        let scene = sample_scene(&mut rng, &config);
        let text = caption(&scene);
        let prompt = parse_prompt(&text).unwrap_or_else(|e| panic!("`{text}`: {e}"));
        let size_of = |o: &SceneObject| if scene.size_words { Some(o.size) } else { None };
        let described =
            |s: &ObjectSpec, o: &SceneObject| s.shape == o.shape && s.color == Some(o.color) && s.size == size_of(o);
        match (&prompt, scene.layout) {
            (Prompt::Objects(specs), Layout::List) => {
                assert_eq!(specs.len(), scene.objects.len(), "{text}");
                assert!(specs.iter().zip(&scene.objects).all(|(s, o)| described(s, o)), "{text}");
            }
            (Prompt::Relation { subject, relation, object }, Layout::Relation(truth)) => {
                assert_eq!(scene.objects.len(), 2);
                assert_eq!(*relation, truth, "{text}");
                assert!(described(subject, &scene.objects[0]) && described(object, &scene.objects[1]), "{text}");
            }
            (Prompt::Count { count, spec }, Layout::Count) => {
                assert_eq!(*count, scene.objects.len(), "{text}");
                assert!(scene.objects.iter().all(|o| described(spec, o)), "{text}");
            }
            _ => panic!("`{text}` parsed to {prompt:?} for layout {:?}", scene.layout),
        }
        assert_eq!(prompt.caption(), text);
    }
}

#[test]
fn scenes_respect_their_layout_rules() {
    let config = GenConfig::default();
    let mut rng = StdRng::seed_from_u64(5);
    let mut per_category = [0usize; 4];
    for _ in 0..1000 {
        let scene = sample_scene(&mut rng, &config);
        per_category[Category::ALL.iter().position(|c| *c == scene.category()).unwrap()] += 1;
        let objs = &scene.objects;
        for o in objs {
            let (lo, hi) = if o.size == Size::Small { SMALL_RADIUS } else { LARGE_RADIUS };
            assert!(o.radius >= lo && o.radius <= hi, "{o:?}");
            for c in o.center {
                assert!(c - o.radius >= 0.0 && c + o.radius <= 1.0, "{o:?} leaves the frame");
            }
        }
        // Bounding circles of radius `radius` (which contain every shape) are apart: no overlap.
        for i in 0..objs.len() {
            for j in 0..i {
                let d = ((objs[i].center[0] - objs[j].center[0]).powi(2)
                    + (objs[i].center[1] - objs[j].center[1]).powi(2))
                .sqrt();
                assert!(d > objs[i].radius + objs[j].radius, "objects {i} and {j} overlap");
            }
        }
        let kinds: Vec<(Shape, Color)> = objs.iter().map(|o| (o.shape, o.color)).collect();
        match scene.layout {
            Layout::List if objs.len() > 1 => {
                for i in 0..objs.len() {
                    for j in 0..i {
                        assert!(
                            kinds[i].0 != kinds[j].0 && kinds[i].1 != kinds[j].1,
                            "binding pair shares an attribute"
                        );
                    }
                }
            }
            Layout::List => assert_eq!(objs.len(), 1),
            Layout::Relation(relation) => {
                assert_ne!(kinds[0], kinds[1]);
                let (a, b) = (objs[0].center, objs[1].center);
                let (along, across) = match relation {
                    Relation::LeftOf => (b[0] - a[0], b[1] - a[1]),
                    Relation::RightOf => (a[0] - b[0], b[1] - a[1]),
                    Relation::Above => (b[1] - a[1], b[0] - a[0]),
                    Relation::Below => (a[1] - b[1], b[0] - a[0]),
                };
                assert!(along >= objs[0].radius * 0.886 + objs[1].radius * 0.886 + 0.05, "{relation:?} too close");
                assert!(across.abs() <= 0.5 * along + 1e-6, "{relation:?} too slanted");
            }
            Layout::Count => {
                assert!(objs.len() == 2 || objs.len() == 3);
                assert!(kinds.iter().all(|k| *k == kinds[0]));
                if scene.size_words {
                    assert!(objs.iter().all(|o| o.size == objs[0].size));
                }
            }
        }
    }
    assert!(per_category.iter().all(|n| (200..300).contains(n)), "{per_category:?}");
    let prompts = prompt_set(9, 40);
    for category in Category::ALL {
        assert_eq!(prompts.iter().filter(|(_, c)| *c == category).count(), 10);
    }
    for (text, category) in &prompts {
        assert_eq!(parse_prompt(text).unwrap().category(), *category, "{text}");
    }
}

/// Sum of per-pixel coverage (channel value over the drawn color's channel) and its centroid.
fn coverage(image: &RgbImage, color: Color) -> (f64, [f64; 2]) {
    let reference = color.rgb()[0] as f64;
    let (mut total, mut sx, mut sy) = (0.0, 0.0, 0.0);
    for (x, y, p) in image.enumerate_pixels() {
        let c = p.0[0] as f64 / reference;
        total += c;
        sx += c * (x as f64 + 0.5);
        sy += c * (y as f64 + 0.5);
    }
    (total, [sx / total, sy / total])
}

#[test]
fn rendered_areas_and_centroids_match_closed_forms() {
    let side = 128.0f64;
    let r = 0.25f64;
    let cases = [
        // shape, area in unit^2, centroid offset in y (triangles point up: centroid a third below center)
        (Shape::Circle, std::f64::consts::PI * r * r, 0.0),
        (Shape::Square, (2.0 * 0.886 * r).powi(2), 0.0),
        (Shape::Triangle, 2.0 * r * r, r / 3.0),
    ];
    for (shape, area, dy) in cases {
        let scene = Scene {
            objects: vec![object(shape, Color::Red, Size::Large, [0.45, 0.55], r as f32)],
            layout: Layout::List,
            size_words: false,
        };
        // Anti-aliased within 0.5 %; point-sampled edges are whole pixels, within 2.5 %.
        for (supersample, tolerance) in [(4, 0.005), (1, 0.025)] {
            let image = render_with(&scene, 128, supersample);
            let (total, centroid) = coverage(&image, Color::Red);
            let want = area * side * side;
            assert!((total - want).abs() / want < tolerance, "{shape:?} x{supersample}: area {total} vs {want}");
            assert!((centroid[0] - 0.45 * side).abs() < 0.5, "{shape:?} x{supersample}: x {}", centroid[0]);
            assert!((centroid[1] - (0.55 + dy) * side).abs() < 0.5, "{shape:?} x{supersample}: y {}", centroid[1]);
        }
        let image = render(&scene, 128);
        assert_eq!(image.get_pixel(57, 75), &Rgb(Color::Red.rgb()), "inside is the pure color");
        assert_eq!(image.get_pixel(2, 2), &Rgb([0, 0, 0]), "background is black");
    }
}

#[test]
fn scorer_accepts_ground_truth_renders() {
    let scenes = benchmark_scenes(11, 400);
    let prompts: Vec<Prompt> = scenes.iter().map(|s| parse_prompt(&caption(s)).unwrap()).collect();
    for (size, supersample) in [(64, 4), (128, 4), (64, 1)] {
        let report = score_scenes(&scenes, &prompts, |_, s| render_with(s, size, supersample));
        println!("{size}px x{supersample}:\n{report}");
        for category in Category::ALL {
            let acc = accuracy(&report, category);
            assert!(acc >= 0.98, "{category} at {size}px: {acc}");
        }
        assert!(report.exact.accuracy >= 0.98, "nothing but the named objects at {size}px:\n{report}");
    }
    // Training scenes (other seeds, random categories) at 64 and 128 too.
    let mut rng = StdRng::seed_from_u64(99);
    let training: Vec<Scene> = (0..200).map(|_| sample_scene(&mut rng, &GenConfig::default())).collect();
    let prompts: Vec<Prompt> = training.iter().map(|s| s.prompt()).collect();
    for size in [64, 128] {
        let report = score_scenes(&training, &prompts, |_, s| render(s, size));
        assert!(report.images_passed as f64 >= 0.98 * report.images as f64, "{size}px:\n{report}");
    }
}

/// Blurs with a Gaussian of `sigma` pixels and adds uniform noise of +-`noise` per channel.
fn degrade(image: &RgbImage, sigma: f32, noise: f32, seed: u64) -> RgbImage {
    let blurred = image::imageops::blur(image, sigma);
    let mut rng = StdRng::seed_from_u64(seed);
    RgbImage::from_fn(image.width(), image.height(), |x, y| {
        let p = blurred.get_pixel(x, y).0;
        Rgb(p.map(|v| (v as f32 + rng.random_range(-noise..noise)).round().clamp(0.0, 255.0) as u8))
    })
}

#[test]
fn scorer_tolerates_blur_and_noise() {
    // A trained model's pictures are softer and noisier than the renders; the scorer must not
    // blame the model for that.
    let scenes = benchmark_scenes(14, 200);
    let prompts: Vec<Prompt> = scenes.iter().map(|s| s.prompt()).collect();
    for size in [64u32, 128] {
        let sigma = 0.7 * size as f32 / 64.0;
        let report = score_scenes(&scenes, &prompts, |i, s| degrade(&render(s, size), sigma, 25.0, i as u64));
        for category in Category::ALL {
            assert!(accuracy(&report, category) >= 0.95, "{category} at {size}px:\n{report}");
        }
    }
}

#[test]
fn scorer_rejects_wrong_pictures() {
    let scenes = benchmark_scenes(12, 200);
    let prompts: Vec<Prompt> = scenes.iter().map(|s| s.prompt()).collect();
    let size = 64;

    // Blank, gray and noise pictures satisfy nothing.
    let mut rng = StdRng::seed_from_u64(0);
    let noise: Vec<RgbImage> = (0..scenes.len())
        .map(|_| RgbImage::from_fn(size, size, |_, _| Rgb([rng.random(), rng.random(), rng.random()])))
        .collect();
    let black = vec![RgbImage::new(size, size); scenes.len()];
    let gray = vec![RgbImage::from_pixel(size, size, Rgb([128, 128, 128])); scenes.len()];
    for (name, images) in [("black", &black), ("gray", &gray), ("noise", &noise)] {
        let report = score(images.iter().zip(&prompts));
        assert_eq!(report.images_passed, 0, "{name}:\n{report}");
    }

    // A stray object beside the right ones: every check still passes, the exact row does not.
    let stray = |_: usize, s: &Scene| {
        let mut s = s.clone();
        let corner = [0.12, 0.12];
        if s.objects.iter().all(|o| (o.center[0] - corner[0]).abs() + (o.center[1] - corner[1]).abs() > 0.35) {
            let color = Color::ALL.into_iter().find(|c| s.objects.iter().all(|o| o.color != *c)).unwrap();
            s.objects.push(object(Shape::Square, color, Size::Small, corner, 0.06));
        }
        render(&s, size)
    };
    let report = score_scenes(&scenes, &prompts, stray);
    println!("with a stray object:\n{report}");
    let with_stray = report.items.iter().filter(|v| v.extra_objects > 0).count();
    let stray_passed = report.items.iter().filter(|v| v.extra_objects > 0 && v.passed).count();
    assert!(with_stray as f64 >= 0.5 * report.images as f64, "the stray square must be seen:\n{report}");
    // The checks ignore it (a count of uncolored squares aside)...
    assert!(stray_passed as f64 >= 0.8 * with_stray as f64, "{stray_passed} of {with_stray}:\n{report}");
    // ...the exact row does not.
    assert_eq!(report.exact.passed, report.images_passed - stray_passed, "{report}");

    // Pictures of other scenes: the scene of the same category and index from another seed.
    let others = benchmark_scenes(13, 200);
    let report = score_scenes(&scenes, &prompts, |i, _| render(&others[i], size));
    println!("other scenes:\n{report}");
    for category in Category::ALL {
        assert!(accuracy(&report, category) <= 0.12, "{category} on other scenes:\n{report}");
    }

    // Swapped colors: each color and each shape is there, bound to the wrong partner.
    let binding: Vec<usize> = (0..scenes.len()).filter(|&i| scenes[i].category() == Category::Binding).collect();
    let swapped = |i: usize, s: &Scene| {
        let mut s = s.clone();
        if binding.contains(&i) {
            let c0 = s.objects[0].color;
            s.objects[0].color = s.objects[1].color;
            s.objects[1].color = c0;
        }
        render(&s, size)
    };
    let report = score_scenes(&scenes, &prompts, swapped);
    assert!(check_accuracy(&report, "colors") >= 0.98, "{report}");
    assert!(check_accuracy(&report, "shapes") >= 0.98, "{report}");
    assert!(check_accuracy(&report, "binding") <= 0.02, "{report}");

    // Wrong relation: the true picture against the opposite relation, and the horizontally mirrored
    // picture against the true left / right relation.
    let opposite = |r: Relation| match r {
        Relation::LeftOf => Relation::RightOf,
        Relation::RightOf => Relation::LeftOf,
        Relation::Above => Relation::Below,
        Relation::Below => Relation::Above,
    };
    let flipped: Vec<Prompt> = prompts
        .iter()
        .map(|p| match p {
            Prompt::Relation { subject, relation, object } => {
                Prompt::Relation { subject: *subject, relation: opposite(*relation), object: *object }
            }
            other => other.clone(),
        })
        .collect();
    let report = score_scenes(&scenes, &flipped, |_, s| render(s, size));
    assert!(check_accuracy(&report, "objects") >= 0.98, "{report}");
    assert!(check_accuracy(&report, "relation") <= 0.02, "{report}");
    let horizontal: Vec<usize> = (0..scenes.len())
        .filter(|&i| matches!(scenes[i].layout, Layout::Relation(Relation::LeftOf | Relation::RightOf)))
        .collect();
    assert!(horizontal.len() >= 10);
    let mirrored: Vec<RgbImage> =
        horizontal.iter().map(|&i| image::imageops::flip_horizontal(&render(&scenes[i], size))).collect();
    let report = score(mirrored.iter().zip(horizontal.iter().map(|&i| &prompts[i])));
    assert!(check_accuracy(&report, "relation") <= 0.02, "{report}");

    // Wrong count: one object fewer, or one recolored to another palette color.
    let counting: Vec<usize> = (0..scenes.len()).filter(|&i| scenes[i].category() == Category::Counting).collect();
    for recolor in [false, true] {
        let wrong = |_: usize, s: &Scene| {
            let mut s = s.clone();
            if s.layout == Layout::Count {
                if recolor {
                    let other = Color::ALL.into_iter().find(|c| *c != s.objects[0].color).unwrap();
                    s.objects[0].color = other;
                } else {
                    s.objects.pop();
                }
            }
            render(&s, size)
        };
        let report = score_scenes(&scenes, &prompts, wrong);
        let count = report.check("count").unwrap();
        assert_eq!(count.total, counting.len());
        assert!(count.accuracy <= 0.02, "recolor {recolor}:\n{report}");
    }

    // Wrong count the other way: true pictures against one more and one fewer in the prompt.
    for delta in [1i64, -1] {
        let miscounted: Vec<Prompt> = prompts
            .iter()
            .map(|p| match p {
                Prompt::Count { count, spec } => Prompt::Count { count: (*count as i64 + delta) as usize, spec: *spec },
                other => other.clone(),
            })
            .collect();
        let report = score_scenes(&scenes, &miscounted, |_, s| render(s, size));
        assert!(check_accuracy(&report, "count") <= 0.02, "count {delta:+}:\n{report}");
    }

    // Wrong size: every object of a scene whose caption names sizes drawn at the other size.
    let named: Vec<usize> = (0..scenes.len()).filter(|&i| scenes[i].size_words).collect();
    let resized: Vec<RgbImage> = named
        .iter()
        .map(|&i| {
            let mut s = scenes[i].clone();
            for o in &mut s.objects {
                let (size_class, radius) = match o.size {
                    Size::Small => (Size::Large, LARGE_RADIUS.0),
                    Size::Large => (Size::Small, SMALL_RADIUS.1),
                };
                o.size = size_class;
                o.radius = radius;
            }
            render(&s, size)
        })
        .collect();
    let report = score(resized.iter().zip(named.iter().map(|&i| &prompts[i])));
    assert!(report.images_passed as f64 <= 0.02 * report.images as f64, "{report}");
}

#[test]
fn shape_color_and_size_classification_on_clean_renders() {
    let mut rng = StdRng::seed_from_u64(17);
    let config = GenConfig::default();
    for size in [64u32, 128] {
        let mut confusion = [[0usize; 3]; 3];
        let (mut wrong_color, mut wrong_size, mut total) = (0, 0, 0);
        for i in 0..450 {
            let mut scene = sample_scene_of(&mut rng, Category::Single, &config);
            scene.objects[0].shape = Shape::ALL[i % 3];
            let blobs = find_blobs(&render(&scene, size));
            assert_eq!(blobs.len(), 1, "{}", caption(&scene));
            let (truth, blob) = (&scene.objects[0], &blobs[0]);
            let index = |s: Shape| Shape::ALL.iter().position(|x| *x == s).unwrap();
            confusion[index(truth.shape)][index(blob.shape)] += 1;
            wrong_color += usize::from(blob.color != truth.color);
            wrong_size += usize::from(blob.size != truth.size);
            total += 1;
            let off =
                ((blob.centroid[0] - truth.center[0]).powi(2) + (blob.centroid[1] - truth.center[1]).powi(2)).sqrt();
            assert!(off < truth.radius * 0.5, "centroid {:?} far from {:?}", blob.centroid, truth.center);
        }
        let confused: usize = (0..3)
            .flat_map(|a| (0..3).map(move |b| (a, b)))
            .filter(|(a, b)| a != b)
            .map(|(a, b)| confusion[a][b])
            .sum();
        println!("{size}px confusion (rows truth circle/square/triangle): {confusion:?}");
        assert!(confused as f64 <= 0.01 * total as f64, "{size}px: {confusion:?}");
        assert_eq!(wrong_color, 0, "{size}px");
        assert!(wrong_size as f64 <= 0.01 * total as f64, "{size}px: {wrong_size} sizes wrong");
    }
}

#[test]
fn evaluate_images_reports_per_category_and_check() {
    let prompts = prompt_set(5, 8);
    let scenes = benchmark_scenes(5, 8);
    // Even items true renders, odd items black: half of every category passes.
    let images: Vec<RgbImage> =
        scenes.iter().enumerate().map(|(i, s)| if i % 8 < 4 { render(s, 64) } else { RgbImage::new(64, 64) }).collect();
    let report = evaluate_images(&prompts, &images).unwrap();
    assert_eq!(report.images, 8);
    assert_eq!(report.images_passed, 4);
    for category in Category::ALL {
        let tally = report.category(category).unwrap();
        assert_eq!((tally.total, tally.passed), (2, 1), "{category}");
    }
    assert!((report.overall - 0.5).abs() < 1e-12);
    let json: serde_json::Value = serde_json::from_str(&report.to_json().unwrap()).unwrap();
    assert_eq!(json["categories"].as_array().unwrap().len(), 4);
    assert_eq!(json["items"].as_array().unwrap().len(), 8);
    let table = report.to_string();
    for word in ["single", "binding", "relation", "counting", "overall", "count"] {
        assert!(table.contains(word), "{table}");
    }
    assert!(matches!(evaluate_images(&prompts, &images[..7]), Err(Error::Usage(_))));
    let bad = vec![("a red hexagon".to_string(), Category::Single)];
    assert!(matches!(evaluate_images(&bad, &images[..1]), Err(Error::Usage(_))));
    // One verdict's checks, by name.
    let verdict = check_image(&render(&scenes[1], 64), &parse_prompt(&prompts[1].0).unwrap());
    let names: Vec<&str> = verdict.checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["colors", "shapes", "binding"]);
}
