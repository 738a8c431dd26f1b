//! Replays every committed fuzz input on stable, through the same checks the fuzz targets run:
//! the seed corpora in `fuzz/corpus/<target>/` and the inputs that once failed, in
//! `fuzz/regressions/<target>/`. The checks are compiled with the `fuzzing` feature
//! (`cargo test --all-features`, as `.ci/run` runs it).
#![cfg(feature = "fuzzing")]

use std::fs;
use std::path::{Path, PathBuf};

use artifact_events::fuzz_checks::TARGETS;

#[test]
fn every_corpus_and_regression_input_still_passes_its_check() {
    for (target, check) in TARGETS {
        let corpus = inputs(&fuzz_dir().join("corpus").join(target));
        assert!(!corpus.is_empty(), "fuzz/corpus/{target} has no inputs");
        let regressions = inputs(&fuzz_dir().join("regressions").join(target));
        for path in corpus.iter().chain(&regressions) {
            // Printed before the check so that a failure names its input.
            eprintln!("replaying {}", path.display());
            check(&fs::read(path).unwrap());
        }
    }
}

#[test]
fn every_fuzz_target_has_a_check_and_every_check_a_target() {
    let mut files: Vec<String> = inputs(&fuzz_dir().join("fuzz_targets"))
        .iter()
        .map(|path| path.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    let mut names: Vec<String> = TARGETS.iter().map(|(name, _)| name.to_string()).collect();
    files.sort();
    names.sort();
    assert_eq!(files, names);
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files in `dir`, except dotfiles such as `.gitkeep`; panics if `dir` is missing, so
/// that a moved directory cannot make the replay silently test nothing.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .unwrap_or_else(|error| panic!("{}: {error}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            path.is_file() && !path.file_name().unwrap().to_string_lossy().starts_with('.')
        })
        .collect()
}
