//! Aggregates shapes-benchmark verdicts into accuracies per category and per check, printable as a
//! table and serializable to JSON.

use std::fmt;

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::data::prompt::{parse_prompt, Category, Prompt};
use crate::error::{Error, Result};
use crate::eval::shapes::{check_image, Verdict};

/// Passed out of total for one category or one check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub name: String,
    pub total: usize,
    pub passed: usize,
    pub accuracy: f64,
}

impl Tally {
    fn new(name: &str, total: usize, passed: usize) -> Self {
        let accuracy = if total == 0 { 0.0 } else { passed as f64 / total as f64 };
        Tally { name: name.into(), total, passed, accuracy }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Mean of the per-category accuracies (categories with no image left out).
    pub overall: f64,
    /// Images that passed every check, out of all images.
    pub images_passed: usize,
    pub images: usize,
    /// Images that passed every check and hold nothing else: no object beyond those the prompt
    /// names (the checks alone accept a right object among stray ones).
    pub exact: Tally,
    /// In the order single, binding, relation, counting.
    pub categories: Vec<Tally>,
    /// Per check name, in order of first appearance.
    pub checks: Vec<Tally>,
    /// One verdict per image, in input order.
    pub items: Vec<Verdict>,
}

impl Report {
    pub fn category(&self, category: Category) -> Option<&Tally> {
        self.categories.iter().find(|t| t.name == category.name())
    }

    pub fn check(&self, name: &str) -> Option<&Tally> {
        self.checks.iter().find(|t| t.name == name)
    }

    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(|e| Error::Other(format!("shapes report to JSON: {e}")))
    }
}

/// Builds a report from verdicts, grouping each under the category given beside it.
pub fn score_verdicts(verdicts: Vec<(Category, Verdict)>) -> Report {
    let mut categories = Vec::new();
    for category in Category::ALL {
        let mine: Vec<&Verdict> = verdicts.iter().filter(|(c, _)| *c == category).map(|(_, v)| v).collect();
        if !mine.is_empty() {
            categories.push(Tally::new(category.name(), mine.len(), mine.iter().filter(|v| v.passed).count()));
        }
    }
    let mut check_names: Vec<String> = Vec::new();
    for (_, verdict) in &verdicts {
        for check in &verdict.checks {
            if !check_names.contains(&check.name) {
                check_names.push(check.name.clone());
            }
        }
    }
    let checks = check_names
        .iter()
        .map(|name| {
            let results: Vec<bool> = verdicts
                .iter()
                .flat_map(|(_, v)| v.checks.iter().filter(|c| &c.name == name).map(|c| c.passed))
                .collect();
            Tally::new(name, results.len(), results.iter().filter(|p| **p).count())
        })
        .collect();
    let overall = if categories.is_empty() {
        0.0
    } else {
        categories.iter().map(|t| t.accuracy).sum::<f64>() / categories.len() as f64
    };
    let items: Vec<Verdict> = verdicts.into_iter().map(|(_, v)| v).collect();
    let exact = items.iter().filter(|v| v.passed && v.extra_objects == 0).count();
    Report {
        exact: Tally::new("exact", items.len(), exact),
        overall,
        images_passed: items.iter().filter(|v| v.passed).count(),
        images: items.len(),
        categories,
        checks,
        items,
    }
}

/// Scores images against their parsed prompts; each prompt's own category groups it.
pub fn score<'a>(items: impl IntoIterator<Item = (&'a RgbImage, &'a Prompt)>) -> Report {
    score_verdicts(items.into_iter().map(|(image, prompt)| (prompt.category(), check_image(image, prompt))).collect())
}

/// Scores already generated images against the benchmark prompts they were generated from (the
/// output of `data::shapes::prompt_set`), image i for prompt i.
pub fn evaluate_images(prompts: &[(String, Category)], images: &[RgbImage]) -> Result<Report> {
    if prompts.len() != images.len() {
        return Err(Error::usage(format!(
            "shapes evaluation: {} prompts but {} images; give one image per prompt",
            prompts.len(),
            images.len()
        )));
    }
    let mut verdicts = Vec::with_capacity(prompts.len());
    for ((text, category), image) in prompts.iter().zip(images) {
        let prompt = parse_prompt(text)?;
        verdicts.push((*category, check_image(image, &prompt)));
    }
    Ok(score_verdicts(verdicts))
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let row = |f: &mut fmt::Formatter<'_>, t: &Tally| {
            writeln!(f, "{:<10} {:>7} {:>7} {:>9.1}%", t.name, t.total, t.passed, 100.0 * t.accuracy)
        };
        writeln!(f, "{:<10} {:>7} {:>7} {:>10}", "category", "images", "passed", "accuracy")?;
        for t in &self.categories {
            row(f, t)?;
        }
        writeln!(f, "{:<10} {:>7} {:>7} {:>9.1}%", "overall", self.images, self.images_passed, 100.0 * self.overall)?;
        row(f, &self.exact)?;
        writeln!(f, "(exact: passed with no other object drawn)")?;
        writeln!(f)?;
        writeln!(f, "{:<10} {:>7} {:>7} {:>10}", "check", "images", "passed", "accuracy")?;
        for t in &self.checks {
            row(f, t)?;
        }
        Ok(())
    }
}
