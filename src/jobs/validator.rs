//! Validation of generated artifacts against their schema and the request.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};

use crate::jobs::generator::{ArtifactType, GenerationRequest, OPTIONS_PER_QUESTION};

const SHORTFALL_HINT: &str =
    "the content holds too little material — send source text, or configure an LLM generator";

type Object = Map<String, Value>;

/// Checks a generated artifact against its schema and the request; returns every problem found.
pub fn validate(request: &GenerationRequest, output: &Value) -> Result<(), Vec<String>> {
    let mut errors = Vec::new();
    match output.as_object() {
        None => errors.push("output is not a JSON object".to_string()),
        Some(object) => match request.artifact_type {
            ArtifactType::Quiz => check_quiz(object, request.count, &mut errors),
            ArtifactType::Flashcards => check_flashcards(object, request.count, &mut errors),
            ArtifactType::Summary => check_summary(object, &mut errors),
        },
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Turns validation errors into the reason a user can act on.
pub fn failure_reason(request: &GenerationRequest, errors: &[String]) -> String {
    // A shortfall is the one problem a user can fix, by supplying more material.
    if let Some(shortfall) = errors.iter().find(|e| is_count_shortfall(e)) {
        return format!("{shortfall}: {SHORTFALL_HINT}");
    }
    if errors.is_empty() {
        return format!(
            "the generated {} was rejected",
            request.artifact_type.as_str()
        );
    }
    errors.join("; ")
}

/// Recognises "expected N things, got M" (or "expected at least N ...") with M < N.
fn is_count_shortfall(error: &str) -> bool {
    let Some((wanted, got)) = error
        .strip_prefix("expected ")
        .and_then(|rest| rest.split_once(", got "))
    else {
        return false;
    };
    let wanted = wanted
        .split_whitespace()
        .find_map(|w| w.parse::<usize>().ok());
    matches!((wanted, got.trim().parse::<usize>()), (Some(w), Ok(g)) if g < w)
}

fn check_quiz(object: &Object, count: usize, errors: &mut Vec<String>) {
    check_keys(object, &["questions"], errors);
    let Some(questions) = array(object, "questions", errors) else {
        return;
    };
    check_count(count, questions.len(), "question", errors);
    let mut first_seen: HashMap<String, usize> = HashMap::new();
    for (i, question) in questions.iter().enumerate() {
        let label = format!("question {}", i + 1);
        let Some(question) = as_object(question, &label, errors) else {
            continue;
        };
        if let Some(text) = text(question, "question", &label, errors) {
            check_distinct(&mut first_seen, text, i + 1, &label, "question", errors);
        }
        check_options(question, &label, errors);
        check_answer_index(question, &label, errors);
        text(question, "explanation", &label, errors);
    }
}

fn check_options(question: &Object, label: &str, errors: &mut Vec<String>) {
    let options = match question.get("options") {
        None => return errors.push(format!("{label}: missing \"options\"")),
        Some(Value::Array(options)) => options,
        Some(_) => return errors.push(format!("{label}: options is not an array")),
    };
    if options.len() != OPTIONS_PER_QUESTION {
        errors.push(format!(
            "{label}: expected {OPTIONS_PER_QUESTION} options, got {}",
            options.len()
        ));
    }
    let mut distinct = HashSet::new();
    let mut repeated = false;
    for (j, option) in options.iter().enumerate() {
        match option.as_str() {
            None => errors.push(format!("{label}: option {} is not a string", j + 1)),
            Some(o) if o.trim().is_empty() => {
                errors.push(format!("{label}: option {} is empty", j + 1))
            }
            Some(o) => repeated |= !distinct.insert(o.trim().to_lowercase()),
        }
    }
    if repeated {
        errors.push(format!("{label}: options are not distinct"));
    }
}

fn check_answer_index(question: &Object, label: &str, errors: &mut Vec<String>) {
    match question.get("answer_index") {
        None => errors.push(format!("{label}: missing \"answer_index\"")),
        Some(index) if !(index.is_i64() || index.is_u64()) => {
            errors.push(format!("{label}: answer_index is not an integer"))
        }
        Some(index)
            if index
                .as_u64()
                .is_none_or(|i| i >= OPTIONS_PER_QUESTION as u64) =>
        {
            errors.push(format!(
                "{label}: answer_index {index} is out of range 0..{OPTIONS_PER_QUESTION}"
            ))
        }
        Some(_) => {}
    }
}

fn check_flashcards(object: &Object, count: usize, errors: &mut Vec<String>) {
    check_keys(object, &["cards"], errors);
    let Some(cards) = array(object, "cards", errors) else {
        return;
    };
    check_count(count, cards.len(), "card", errors);
    let mut first_seen: HashMap<String, usize> = HashMap::new();
    for (i, card) in cards.iter().enumerate() {
        let label = format!("card {}", i + 1);
        let Some(card) = as_object(card, &label, errors) else {
            continue;
        };
        if let Some(front) = text(card, "front", &label, errors) {
            check_distinct(&mut first_seen, front, i + 1, &label, "card", errors);
        }
        text(card, "back", &label, errors);
    }
}

fn check_summary(object: &Object, errors: &mut Vec<String>) {
    check_keys(object, &["summary", "key_points"], errors);
    match object.get("summary") {
        None => errors.push("missing \"summary\"".to_string()),
        Some(Value::String(s)) if s.trim().is_empty() => {
            errors.push("summary is empty".to_string())
        }
        Some(Value::String(_)) => {}
        Some(_) => errors.push("summary is not a string".to_string()),
    }
    let Some(points) = array(object, "key_points", errors) else {
        return;
    };
    if points.is_empty() {
        errors.push("expected at least 1 key point, got 0".to_string());
    }
    for (i, point) in points.iter().enumerate() {
        match point.as_str() {
            None => errors.push(format!("key point {} is not a string", i + 1)),
            Some(p) if p.trim().is_empty() => errors.push(format!("key point {} is empty", i + 1)),
            Some(_) => {}
        }
    }
}

fn check_keys(object: &Object, allowed: &[&str], errors: &mut Vec<String>) {
    for key in object.keys().filter(|k| !allowed.contains(&k.as_str())) {
        errors.push(format!("unexpected key \"{key}\""));
    }
}

fn check_count(expected: usize, got: usize, noun: &str, errors: &mut Vec<String>) {
    if expected != got {
        let plural = if expected == 1 { "" } else { "s" };
        errors.push(format!("expected {expected} {noun}{plural}, got {got}"));
    }
}

/// Records `text` (case-insensitively) and reports it if an earlier item already used it.
fn check_distinct(
    first_seen: &mut HashMap<String, usize>,
    text: &str,
    number: usize,
    label: &str,
    noun: &str,
    errors: &mut Vec<String>,
) {
    let key = text.trim().to_lowercase();
    match first_seen.get(&key) {
        Some(first) => errors.push(format!("{label}: duplicates {noun} {first}")),
        None => {
            first_seen.insert(key, number);
        }
    }
}

fn array<'a>(object: &'a Object, key: &str, errors: &mut Vec<String>) -> Option<&'a Vec<Value>> {
    match object.get(key) {
        None => errors.push(format!("missing \"{key}\"")),
        Some(Value::Array(items)) => return Some(items),
        Some(_) => errors.push(format!("{key} is not an array")),
    }
    None
}

fn as_object<'a>(value: &'a Value, label: &str, errors: &mut Vec<String>) -> Option<&'a Object> {
    let object = value.as_object();
    if object.is_none() {
        errors.push(format!("{label}: not an object"));
    }
    object
}

/// A required string field that must not be blank.
fn text<'a>(
    item: &'a Object,
    field: &str,
    label: &str,
    errors: &mut Vec<String>,
) -> Option<&'a str> {
    match item.get(field) {
        None => errors.push(format!("{label}: missing \"{field}\"")),
        Some(Value::String(s)) if s.trim().is_empty() => {
            errors.push(format!("{label}: {field} is empty"))
        }
        Some(Value::String(s)) => return Some(s),
        Some(_) => errors.push(format!("{label}: {field} is not a string")),
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(artifact_type: ArtifactType, count: usize) -> GenerationRequest {
        GenerationRequest {
            artifact_type,
            content: String::new(),
            count,
        }
    }

    fn question(text: &str) -> Value {
        json!({
            "question": text,
            "options": ["mitochondria", "chloroplasts", "ribosomes", "vacuoles"],
            "answer_index": 1,
            "explanation": "From the text: Photosynthesis happens in chloroplasts.",
        })
    }

    fn quiz_errors(count: usize, output: Value) -> Vec<String> {
        validate(&request(ArtifactType::Quiz, count), &output).expect_err("output is invalid")
    }

    /// Errors for a one-question quiz whose question has `field` set to `value`.
    fn question_errors(field: &str, value: Value) -> Vec<String> {
        let mut broken = question("Photosynthesis happens in _____.");
        broken[field] = value;
        quiz_errors(1, json!({"questions": [broken]}))
    }

    fn card(front: &str, back: &str) -> Value {
        json!({"front": front, "back": back})
    }

    #[test]
    fn well_formed_artifacts_pass() {
        let quiz = json!({"questions": [question("A _____ one."), question("A _____ two.")]});
        assert_eq!(validate(&request(ArtifactType::Quiz, 2), &quiz), Ok(()));
        let cards = json!({"cards": [card("ATP", "ATP stores energy."), card("atp synthase", "It makes ATP.")]});
        assert_eq!(
            validate(&request(ArtifactType::Flashcards, 2), &cards),
            Ok(())
        );
        let summary =
            json!({"summary": "Plants make sugar.", "key_points": ["Plants make sugar."]});
        assert_eq!(
            validate(&request(ArtifactType::Summary, 5), &summary),
            Ok(())
        );
    }

    #[test]
    fn schema_errors_are_reported() {
        assert_eq!(quiz_errors(1, json!([])), ["output is not a JSON object"]);
        assert_eq!(quiz_errors(1, json!({})), ["missing \"questions\""]);
        assert_eq!(
            quiz_errors(1, json!({"questions": {}})),
            ["questions is not an array"]
        );
        assert_eq!(
            quiz_errors(1, json!({"questions": [question("A _____.")], "extra": 1})),
            ["unexpected key \"extra\""]
        );
        assert_eq!(
            quiz_errors(1, json!({"questions": ["text"]})),
            ["question 1: not an object"]
        );
    }

    #[test]
    fn question_count_must_match_the_request() {
        let one = json!({"questions": [question("A _____.")]});
        assert_eq!(quiz_errors(5, one.clone()), ["expected 5 questions, got 1"]);
        let two = json!({"questions": [question("A _____."), question("B _____.")]});
        assert_eq!(quiz_errors(1, two), ["expected 1 question, got 2"]);
    }

    #[test]
    fn duplicate_questions_are_reported_case_insensitively() {
        let quiz = json!({"questions": [question("A _____."), question("B _____."), question(" a _____.")]});
        assert_eq!(quiz_errors(3, quiz), ["question 3: duplicates question 1"]);
    }

    #[test]
    fn options_must_be_four_distinct_non_empty_strings() {
        assert_eq!(
            question_errors("options", json!(["a", "b", "c"])),
            ["question 1: expected 4 options, got 3"]
        );
        assert_eq!(
            question_errors("options", json!(["Cell", "cell ", "wall", "root"])),
            ["question 1: options are not distinct"]
        );
        assert_eq!(
            question_errors("options", json!(["a", " ", "c", "d"])),
            ["question 1: option 2 is empty"]
        );
        assert_eq!(
            question_errors("options", json!(["a", "b", 3, "d"])),
            ["question 1: option 3 is not a string"]
        );
        assert_eq!(
            question_errors("options", json!("a")),
            ["question 1: options is not an array"]
        );
    }

    #[test]
    fn answer_index_must_be_an_integer_in_range() {
        for not_integer in [json!(1.5), json!("1"), json!(null)] {
            assert_eq!(
                question_errors("answer_index", not_integer),
                ["question 1: answer_index is not an integer"]
            );
        }
        assert_eq!(
            question_errors("answer_index", json!(4)),
            ["question 1: answer_index 4 is out of range 0..4"]
        );
        assert_eq!(
            question_errors("answer_index", json!(-1)),
            ["question 1: answer_index -1 is out of range 0..4"]
        );
    }

    #[test]
    fn text_fields_must_be_present_strings_and_not_blank() {
        assert_eq!(
            question_errors("question", json!("  ")),
            ["question 1: question is empty"]
        );
        assert_eq!(
            question_errors("explanation", json!("")),
            ["question 1: explanation is empty"]
        );
        assert_eq!(
            question_errors("question", json!(7)),
            ["question 1: question is not a string"]
        );
        let mut missing = question("A _____.");
        missing
            .as_object_mut()
            .expect("object")
            .remove("explanation");
        assert_eq!(
            quiz_errors(1, json!({"questions": [missing]})),
            ["question 1: missing \"explanation\""]
        );
    }

    #[test]
    fn every_problem_is_reported_not_just_the_first() {
        let mut broken = question("");
        broken["answer_index"] = json!(9);
        let errors = quiz_errors(2, json!({"questions": [broken]}));
        assert_eq!(
            errors,
            [
                "expected 2 questions, got 1",
                "question 1: question is empty",
                "question 1: answer_index 9 is out of range 0..4",
            ]
        );
    }

    #[test]
    fn flashcard_errors_are_reported() {
        let validate_cards = |count, cards: Value| {
            validate(
                &request(ArtifactType::Flashcards, count),
                &json!({"cards": cards}),
            )
        };
        assert_eq!(
            validate_cards(5, json!([card("ATP", "ATP stores energy.")])),
            Err(vec!["expected 5 cards, got 1".to_string()])
        );
        assert_eq!(
            validate_cards(
                2,
                json!([card("ATP", "ATP stores energy."), card("NADPH", " ")])
            ),
            Err(vec!["card 2: back is empty".to_string()])
        );
        assert_eq!(
            validate_cards(
                2,
                json!([card("ATP", "ATP stores energy."), card("atp", "Again.")])
            ),
            Err(vec!["card 2: duplicates card 1".to_string()])
        );
        assert_eq!(
            validate_cards(1, json!([{"back": "No front."}])),
            Err(vec!["card 1: missing \"front\"".to_string()])
        );
    }

    #[test]
    fn summary_errors_are_reported() {
        let summary = request(ArtifactType::Summary, 5);
        let check = |output: Value| validate(&summary, &output).expect_err("summary is invalid");
        assert_eq!(
            check(json!({"summary": " ", "key_points": []})),
            ["summary is empty", "expected at least 1 key point, got 0"]
        );
        assert_eq!(
            check(json!({"summary": "Plants.", "key_points": ["Plants.", ""]})),
            ["key point 2 is empty"]
        );
        assert_eq!(
            check(json!({"summary": ["Plants."], "key_points": [1]})),
            ["summary is not a string", "key point 1 is not a string"]
        );
        assert_eq!(
            check(json!({"summary": "Plants."})),
            ["missing \"key_points\""]
        );
    }

    #[test]
    fn failure_reason_adds_a_hint_to_a_count_shortfall() {
        let quiz = request(ArtifactType::Quiz, 5);
        let errors = [
            "question 1: options are not distinct".to_string(),
            "expected 5 questions, got 1".to_string(),
        ];
        assert_eq!(
            failure_reason(&quiz, &errors),
            "expected 5 questions, got 1: the content holds too little material — send source text, or configure an LLM generator"
        );
        let summary = request(ArtifactType::Summary, 5);
        let errors = ["expected at least 1 key point, got 0".to_string()];
        assert!(failure_reason(&summary, &errors).ends_with("or configure an LLM generator"));
    }

    #[test]
    fn failure_reason_joins_other_errors() {
        let quiz = request(ArtifactType::Quiz, 1);
        let errors = [
            "expected 1 question, got 2".to_string(),
            "question 2: options are not distinct".to_string(),
        ];
        assert_eq!(
            failure_reason(&quiz, &errors),
            "expected 1 question, got 2; question 2: options are not distinct"
        );
        assert_eq!(
            failure_reason(&quiz, &[]),
            "the generated quiz was rejected"
        );
    }
}
