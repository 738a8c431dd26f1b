//! A deterministic generator that works offline: cloze quizzes, flashcards and summaries
//! built from the content's own sentences and key terms.

use std::collections::{HashMap, HashSet};

use serde_json::{json, Value};

use super::{
    ArtifactGenerator, ArtifactType, BoxFuture, GenerationError, GenerationRequest,
    OPTIONS_PER_QUESTION,
};

const BLANK: &str = "_____";
const EXPLANATION_PREFIX: &str = "From the text: ";
/// Shorter fragments are headings or debris rather than statements worth quizzing.
const MIN_SENTENCE_WORDS: usize = 4;
/// Short lowercase words are rarely meaningful enough to be key terms.
const MIN_COMMON_TERM_CHARS: usize = 5;
/// Bounds the per-question distractor search on very large inputs.
const MAX_TERMS: usize = 200;
const MAX_SUMMARY_SENTENCES: usize = 3;

/// Sorted, so membership can use binary search.
#[rustfmt::skip]
const STOPWORDS: &[&str] = &[
    "a", "about", "above", "across", "after", "again", "against", "all", "almost", "along",
    "alongside", "also", "although", "always", "am", "among", "an", "and", "another", "any", "are",
    "around", "as", "at", "be", "because", "been", "before", "behind", "being", "below", "beside",
    "besides", "between", "beyond", "both", "but", "by", "can", "cannot", "could", "despite",
    "did", "do", "does", "doing", "down", "during", "each", "either", "else", "enough", "even",
    "ever", "every", "few", "first", "for", "from", "further", "had", "has", "have", "having",
    "he", "her", "here", "hers", "herself", "him", "himself", "his", "how", "however", "i", "if",
    "in", "inside", "into", "is", "it", "its", "itself", "just", "last", "later", "least", "less",
    "like", "many", "may", "might", "more", "most", "much", "must", "my", "myself", "neither",
    "never", "next", "no", "nor", "not", "now", "of", "off", "often", "on", "once", "one", "only",
    "onto", "or", "other", "others", "otherwise", "our", "ours", "ourselves", "out", "outside",
    "over", "own", "per", "perhaps", "quite", "rather", "really", "same", "second", "several",
    "shall", "she", "should", "since", "so", "some", "something", "soon", "still", "such", "than",
    "that", "the", "their", "theirs", "them", "themselves", "then", "there", "therefore", "these",
    "they", "thing", "things", "third", "this", "those", "though", "three", "through",
    "throughout", "thus", "to", "together", "too", "toward", "towards", "two", "under", "unless",
    "until", "up", "upon", "us", "usually", "very", "via", "was", "we", "were", "what", "whatever",
    "when", "whenever", "where", "whereas", "whereby", "wherein", "whether", "which", "while",
    "who", "whole", "whom", "whose", "why", "will", "with", "within", "without", "would", "yet",
    "you", "your", "yours", "yourself",
];

/// Deterministic generator that works offline from the content text alone.
#[derive(Clone, Debug, Default)]
pub struct OfflineGenerator;

impl ArtifactGenerator for OfflineGenerator {
    fn plan<'a>(
        &'a self,
        request: &'a GenerationRequest,
    ) -> BoxFuture<'a, Result<Value, GenerationError>> {
        Box::pin(async move { Ok(plan_for(request)) })
    }

    fn generate<'a>(
        &'a self,
        request: &'a GenerationRequest,
        plan: &'a Value,
    ) -> BoxFuture<'a, Result<Value, GenerationError>> {
        Box::pin(async move { render(request, plan) })
    }

    fn repair<'a>(
        &'a self,
        request: &'a GenerationRequest,
        plan: &'a Value,
        output: &'a Value,
        errors: &'a [String],
    ) -> BoxFuture<'a, Result<Value, GenerationError>> {
        Box::pin(async move {
            if errors.is_empty() {
                return Ok(output.clone());
            }
            repair_output(request, plan, output)
        })
    }
}

// ---------------------------------------------------------------------------
// Text analysis

/// Byte range of a word or phrase within its sentence.
#[derive(Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
}

impl Span {
    fn of(self, text: &str) -> &str {
        &text[self.start..self.end]
    }
}

/// One appearance of a candidate key term in a sentence.
struct Occurrence {
    /// Lowercased text, so the same term matches whatever its capitalisation.
    key: String,
    span: Span,
    /// Capitalised mid-sentence (or a multi-word capitalised phrase), i.e. a name.
    proper: bool,
    /// Capitalised only because it opens the sentence; blanking it would give the answer away.
    at_start: bool,
}

impl Occurrence {
    fn new(text: &str, span: Span, proper: bool, at_start: bool) -> Self {
        let key = span.of(text).to_lowercase();
        Occurrence {
            key,
            span,
            proper,
            at_start,
        }
    }
}

struct Sentence {
    text: String,
    occurrences: Vec<Occurrence>,
}

struct Term {
    key: String,
    display: String,
    proper: bool,
}

struct Analysis {
    sentences: Vec<Sentence>,
    /// Key terms, most important first, capped at `MAX_TERMS`.
    terms: Vec<Term>,
    /// Frequency of every key term (not only the capped ones) across the content.
    frequency: HashMap<String, usize>,
}

fn is_stopword(word: &str) -> bool {
    STOPWORDS
        .binary_search(&word.to_lowercase().as_str())
        .is_ok()
}

fn starts_uppercase(word: &str) -> bool {
    word.chars().next().is_some_and(char::is_uppercase)
}

/// An ordinary word long and specific enough to be a key term.
fn is_content_word(word: &str) -> bool {
    word.chars().count() >= MIN_COMMON_TERM_CHARS
        && word.chars().all(|c| c.is_alphabetic() || c == '-')
        && !is_stopword(word)
}

/// Words are alphanumeric runs; inner hyphens join them ("slow-start").
fn word_spans(text: &str) -> Vec<Span> {
    let mut spans = Vec::new();
    let mut start = None;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let joins = c == '-'
            && start.is_some()
            && chars
                .peek()
                .is_some_and(|&(_, next)| next.is_alphanumeric());
        if c.is_alphanumeric() || joins {
            start.get_or_insert(i);
        } else if let Some(s) = start.take() {
            spans.push(Span { start: s, end: i });
        }
    }
    if let Some(s) = start {
        spans.push(Span {
            start: s,
            end: text.len(),
        });
    }
    spans
}

/// Splits on `.`, `!`, `?` followed by whitespace or the end; whitespace is collapsed so
/// sentences compare equal however the source was wrapped.
fn split_sentences(content: &str) -> Vec<String> {
    let mut sentences = Vec::new();
    let mut seen = HashSet::new();
    let mut current = String::new();
    let mut chars = content.chars().peekable();
    while let Some(c) = chars.next() {
        current.push(c);
        let boundary =
            matches!(c, '.' | '!' | '?') && chars.peek().is_none_or(|n| n.is_whitespace());
        if boundary || chars.peek().is_none() {
            let text = current.split_whitespace().collect::<Vec<_>>().join(" ");
            // Repeated sentences add no material and would yield duplicate questions.
            if word_spans(&text).len() >= MIN_SENTENCE_WORDS && seen.insert(text.to_lowercase()) {
                sentences.push(text);
            }
            current.clear();
        }
    }
    sentences
}

fn find_occurrences(text: &str) -> Vec<Occurrence> {
    let words = word_spans(text);
    let mut found = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let word = words[i].of(text);
        if starts_uppercase(word) {
            // A name may span several capitalised words separated by single spaces.
            let mut j = i + 1;
            while j < words.len()
                && starts_uppercase(words[j].of(text))
                && &text[words[j - 1].end..words[j].start] == " "
            {
                j += 1;
            }
            push_capitalised_run(text, &words[i..j], i == 0, &mut found);
            i = j;
        } else {
            if is_content_word(word) {
                found.push(Occurrence::new(text, words[i], false, false));
            }
            i += 1;
        }
    }
    found
}

fn push_capitalised_run(
    text: &str,
    run: &[Span],
    opens_sentence: bool,
    found: &mut Vec<Occurrence>,
) {
    // "The", "In", ... are capitalised by position, not because they belong to the name.
    let is_filler = |span: &&Span| is_stopword(span.of(text));
    let leading = run.iter().take_while(is_filler).count();
    let trailing = run[leading..].iter().rev().take_while(is_filler).count();
    let trimmed = &run[leading..run.len() - trailing];
    let (Some(&first), Some(&last)) = (trimmed.first(), trimmed.last()) else {
        return;
    };
    if opens_sentence && leading == 0 && trimmed.len() == 1 {
        // A lone capitalised opening word is usually an ordinary word.
        if is_content_word(first.of(text)) {
            found.push(Occurrence::new(text, first, false, true));
        }
        return;
    }
    let phrase = Span {
        start: first.start,
        end: last.end,
    };
    if phrase.of(text).chars().count() >= 2 {
        found.push(Occurrence::new(text, phrase, true, false));
    }
}

fn analyze(content: &str) -> Analysis {
    let sentences: Vec<Sentence> = split_sentences(content)
        .into_iter()
        .map(|text| Sentence {
            occurrences: find_occurrences(&text),
            text,
        })
        .collect();

    #[derive(Default)]
    struct Tally {
        frequency: usize,
        proper_display: Option<String>,
        seen_lowercase: bool,
        first_seen: usize,
    }
    let mut tallies: HashMap<&str, Tally> = HashMap::new();
    let mut order = 0;
    for sentence in &sentences {
        for occurrence in &sentence.occurrences {
            let tally = tallies.entry(occurrence.key.as_str()).or_insert_with(|| {
                order += 1;
                Tally {
                    first_seen: order,
                    ..Tally::default()
                }
            });
            tally.frequency += 1;
            if occurrence.proper {
                tally
                    .proper_display
                    .get_or_insert_with(|| occurrence.span.of(&sentence.text).to_string());
            } else if !occurrence.at_start {
                tally.seen_lowercase = true;
            }
        }
    }
    // A word seen only capitalised at sentence starts is not known to be a term.
    let mut ranked: Vec<(&str, Tally)> = tallies
        .into_iter()
        .filter(|(_, t)| t.proper_display.is_some() || t.seen_lowercase)
        .collect();
    // Fully ordered, so HashMap iteration order cannot leak into the output.
    ranked.sort_by(|(a_key, a), (b_key, b)| {
        b.frequency
            .cmp(&a.frequency)
            .then(b_key.len().cmp(&a_key.len()))
            .then(a.first_seen.cmp(&b.first_seen))
    });
    let frequency = ranked
        .iter()
        .map(|(key, t)| (key.to_string(), t.frequency))
        .collect();
    let terms = ranked
        .into_iter()
        .take(MAX_TERMS)
        .map(|(key, tally)| Term {
            key: key.to_string(),
            proper: tally.proper_display.is_some(),
            display: tally.proper_display.unwrap_or_else(|| key.to_string()),
        })
        .collect();
    Analysis {
        sentences,
        terms,
        frequency,
    }
}

impl Analysis {
    /// Sentence indices, most central first: a sentence scores the occurrences elsewhere
    /// of the key terms it mentions, i.e. how much it overlaps with the rest of the text.
    fn central_order(&self) -> Vec<usize> {
        let scores: Vec<usize> = self
            .sentences
            .iter()
            .map(|sentence| {
                let mut local: HashMap<&str, usize> = HashMap::new();
                for occurrence in &sentence.occurrences {
                    *local.entry(occurrence.key.as_str()).or_default() += 1;
                }
                local
                    .iter()
                    .map(|(key, n)| {
                        self.frequency
                            .get(*key)
                            .map_or(0, |total| total.saturating_sub(*n))
                    })
                    .sum()
            })
            .collect();
        let mut order: Vec<usize> = (0..self.sentences.len()).collect();
        order.sort_by(|&a, &b| scores[b].cmp(&scores[a]).then(a.cmp(&b)));
        order
    }

    fn rank_of(&self, key: &str) -> Option<usize> {
        self.terms.iter().position(|term| term.key == key)
    }
}

// ---------------------------------------------------------------------------
// Planning

fn plan_for(request: &GenerationRequest) -> Value {
    let analysis = analyze(&request.content);
    let kind = request.artifact_type.as_str();
    match request.artifact_type {
        ArtifactType::Quiz => {
            json!({"artifact": kind, "items": plan_quiz(&analysis, request.count)})
        }
        ArtifactType::Flashcards => {
            json!({"artifact": kind, "items": plan_flashcards(&analysis, request.count)})
        }
        ArtifactType::Summary => {
            let order = analysis.central_order();
            let in_text_order = |n: usize| {
                let mut picked: Vec<usize> = order.iter().take(n).copied().collect();
                picked.sort_unstable();
                picked
                    .into_iter()
                    .map(|i| analysis.sentences[i].text.clone())
                    .collect::<Vec<_>>()
            };
            let summary_len = MAX_SUMMARY_SENTENCES.min(order.len().div_ceil(2));
            json!({
                "artifact": kind,
                "summary": in_text_order(summary_len),
                "key_points": in_text_order(request.count),
            })
        }
    }
}

fn plan_quiz(analysis: &Analysis, count: usize) -> Vec<Value> {
    // Without three other terms there are no honest distractors.
    if analysis.terms.len() < OPTIONS_PER_QUESTION {
        return Vec::new();
    }
    let order = analysis.central_order();
    let mut chosen: Vec<(usize, &Occurrence)> = Vec::new();
    let mut used_sentences = HashSet::new();
    let mut used_answers: HashSet<&str> = HashSet::new();
    let mut used_questions = HashSet::new();
    // First pass keeps answers distinct; the second lets central sentences reuse an answer.
    for allow_reused_answer in [false, true] {
        for &index in &order {
            if chosen.len() >= count {
                break;
            }
            if used_sentences.contains(&index) {
                continue;
            }
            let sentence = &analysis.sentences[index];
            let best = sentence
                .occurrences
                .iter()
                .filter(|o| !o.at_start)
                // A term repeated in the sentence would reveal its own blank.
                .filter(|o| {
                    sentence
                        .occurrences
                        .iter()
                        .filter(|x| x.key == o.key)
                        .count()
                        == 1
                })
                .filter(|o| allow_reused_answer || !used_answers.contains(o.key.as_str()))
                .filter_map(|o| analysis.rank_of(&o.key).map(|rank| (o, rank)))
                .min_by_key(|&(o, rank)| (used_answers.contains(o.key.as_str()), rank));
            let Some((occurrence, _)) = best else {
                continue;
            };
            // Sentences differing only in the blanked term would give identical questions.
            let question = cloze(&sentence.text, occurrence.span.start, occurrence.span.end);
            if question.is_some_and(|q| used_questions.insert(q.to_lowercase())) {
                used_sentences.insert(index);
                used_answers.insert(occurrence.key.as_str());
                chosen.push((index, occurrence));
            }
        }
    }
    chosen.sort_by_key(|&(index, _)| index);
    chosen
        .into_iter()
        .map(|(index, answer)| quiz_item(analysis, &analysis.sentences[index], answer))
        .collect()
}

fn quiz_item(analysis: &Analysis, sentence: &Sentence, answer: &Occurrence) -> Value {
    let answer_text = answer.span.of(&sentence.text);
    let answer_len = answer_text.chars().count();
    let in_sentence: HashSet<&str> = sentence
        .occurrences
        .iter()
        .map(|o| o.key.as_str())
        .collect();
    let mut candidates: Vec<&Term> = analysis
        .terms
        .iter()
        .filter(|t| t.key != answer.key)
        .collect();
    // Stable sort: ties keep term rank order. Prefer terms not visible in the question,
    // not overlapping the answer, of the same kind and word ending, and a similar length.
    let answer_ending = ending_class(&answer.key);
    candidates.sort_by_key(|t| {
        (
            in_sentence.contains(t.key.as_str()),
            t.key.contains(&answer.key) || answer.key.contains(&t.key),
            t.proper != answer.proper,
            // Endings say little about names ("Assembly", "July").
            !answer.proper && ending_class(&t.key) != answer_ending,
            t.display.chars().count().abs_diff(answer_len),
        )
    });
    let distractors: Vec<&str> = candidates
        .iter()
        .take(OPTIONS_PER_QUESTION - 1)
        .map(|t| t.display.as_str())
        .collect();
    let answer_index = stable_hash(&sentence.text) % OPTIONS_PER_QUESTION as u64;
    json!({
        "sentence": sentence.text,
        "answer": answer_text,
        "answer_start": answer.span.start,
        "distractors": distractors,
        "answer_index": answer_index,
    })
}

fn plan_flashcards(analysis: &Analysis, count: usize) -> Vec<Value> {
    let mut used_sentences = HashSet::new();
    let mut cards = Vec::new();
    for term in analysis.terms.iter().take(count) {
        // Prefer a sentence no other card uses and a mid-sentence appearance (natural casing).
        let best = analysis
            .sentences
            .iter()
            .enumerate()
            .flat_map(|(index, s)| s.occurrences.iter().map(move |o| (index, s, o)))
            .filter(|(_, _, o)| o.key == term.key)
            .min_by_key(|&(index, _, o)| (used_sentences.contains(&index), o.at_start, index));
        if let Some((index, sentence, occurrence)) = best {
            used_sentences.insert(index);
            let front = occurrence.span.of(&sentence.text);
            cards.push(json!({"front": front, "back": sentence.text}));
        }
    }
    cards
}

/// Crude part-of-speech hint from a lowercase word's ending, so distractors read like the answer.
fn ending_class(key: &str) -> Option<usize> {
    ["ing", "ed", "ly", "s"]
        .iter()
        .position(|ending| key.ends_with(ending))
}

/// The sentence with the byte range `start..end` blanked out.
fn cloze(sentence: &str, start: usize, end: usize) -> Option<String> {
    Some(format!(
        "{}{BLANK}{}",
        sentence.get(..start)?,
        sentence.get(end..)?
    ))
}

/// FNV-1a: stable across runs and platforms, unlike `std`'s randomly seeded hasher.
fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

// ---------------------------------------------------------------------------
// Rendering and repair

fn malformed(what: &str) -> GenerationError {
    GenerationError(format!("malformed plan: {what}"))
}

fn render(request: &GenerationRequest, plan: &Value) -> Result<Value, GenerationError> {
    let kind = request.artifact_type.as_str();
    if plan.get("artifact").and_then(Value::as_str) != Some(kind) {
        return Err(malformed(&format!("not a {kind} plan")));
    }
    let strings = |field: &str| -> Result<Vec<&str>, GenerationError> {
        plan.get(field)
            .and_then(Value::as_array)
            .and_then(|items| items.iter().map(Value::as_str).collect::<Option<Vec<_>>>())
            .ok_or_else(|| malformed(&format!("\"{field}\" is not a list of strings")))
    };
    let items = || {
        plan.get("items")
            .and_then(Value::as_array)
            .ok_or_else(|| malformed("no items"))
    };
    match request.artifact_type {
        ArtifactType::Quiz => {
            let questions = items()?
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    render_question(item).ok_or_else(|| malformed(&format!("item {}", i + 1)))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(json!({"questions": questions}))
        }
        ArtifactType::Flashcards => {
            let cards = items()?
                .iter()
                .map(|item| clean_card(item).ok_or_else(|| malformed("blank card")))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(json!({"cards": cards}))
        }
        ArtifactType::Summary => Ok(json!({
            "summary": strings("summary")?.join(" "),
            "key_points": strings("key_points")?,
        })),
    }
}

fn render_question(item: &Value) -> Option<Value> {
    let sentence = item.get("sentence")?.as_str()?;
    let answer = item.get("answer")?.as_str()?;
    let start = usize::try_from(item.get("answer_start")?.as_u64()?).ok()?;
    let end = start.checked_add(answer.len())?;
    if sentence.get(start..end)? != answer {
        return None;
    }
    let question = cloze(sentence, start, end)?;
    let mut options = item
        .get("distractors")?
        .as_array()?
        .iter()
        .map(Value::as_str)
        .collect::<Option<Vec<_>>>()?;
    let wanted = usize::try_from(item.get("answer_index")?.as_u64()?).unwrap_or(usize::MAX);
    let answer_index = wanted.min(options.len());
    options.insert(answer_index, answer);
    Some(json!({
        "question": question,
        "options": options,
        "answer_index": answer_index,
        "explanation": format!("{EXPLANATION_PREFIX}{sentence}"),
    }))
}

/// Keeps whatever valid items the output has, then tops up from the plan; it can only
/// reuse planned material, so thin content stays short and fails validation.
fn repair_output(
    request: &GenerationRequest,
    plan: &Value,
    output: &Value,
) -> Result<Value, GenerationError> {
    let fresh = render(request, plan)?;
    let merge = |field: &str, key_field: &str, clean: fn(&Value) -> Option<Value>| {
        let mut seen = HashSet::new();
        let listed = |v: &Value| {
            v.get(field)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        let items: Vec<Value> = listed(output)
            .iter()
            .chain(listed(&fresh).iter())
            .filter_map(clean)
            .filter(|item| seen.insert(item[key_field].as_str().unwrap_or_default().to_lowercase()))
            .take(request.count)
            .collect();
        json!({ field: items })
    };
    Ok(match request.artifact_type {
        ArtifactType::Quiz => merge("questions", "question", clean_question),
        ArtifactType::Flashcards => merge("cards", "front", clean_card),
        ArtifactType::Summary => {
            let text = |v: &Value| {
                v.get("summary")
                    .and_then(Value::as_str)
                    .map(str::trim)
                    .unwrap_or_default()
                    .to_string()
            };
            let points = |v: &Value| {
                dedupe(
                    v.get("key_points")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str),
                )
            };
            let summary = Some(text(output))
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| text(&fresh));
            let key_points = Some(points(output))
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| points(&fresh));
            json!({"summary": summary, "key_points": key_points})
        }
    })
}

/// Trimmed, non-empty strings without case-insensitive repeats, in their original order.
fn dedupe<'a>(strings: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut seen = HashSet::new();
    strings
        .map(str::trim)
        .filter(|s| !s.is_empty() && seen.insert(s.to_lowercase()))
        .map(str::to_string)
        .collect()
}

fn non_blank<'a>(item: &'a Value, field: &str) -> Option<&'a str> {
    item.get(field)?
        .as_str()
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

fn clean_card(card: &Value) -> Option<Value> {
    Some(json!({"front": non_blank(card, "front")?, "back": non_blank(card, "back")?}))
}

/// Dedupes the options and re-points `answer_index` at the answer; the answer comes from
/// the old index or, failing that, from matching the cloze question against its sentence.
fn clean_question(item: &Value) -> Option<Value> {
    let question = non_blank(item, "question")?;
    let explanation = non_blank(item, "explanation")?;
    let raw_options = item.get("options")?.as_array()?;
    let answer = item
        .get("answer_index")
        .and_then(Value::as_u64)
        .and_then(|i| raw_options.get(usize::try_from(i).ok()?))
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .or_else(|| cloze_answer(question, explanation))?;
    let options = dedupe(raw_options.iter().filter_map(Value::as_str));
    let same_as_answer = |o: &String| o.to_lowercase() == answer.to_lowercase();
    let answer_position = options.iter().position(same_as_answer).unwrap_or(0);
    let mut others: Vec<String> = options
        .into_iter()
        .filter(|o| !same_as_answer(o))
        .take(OPTIONS_PER_QUESTION - 1)
        .collect();
    if others.len() < OPTIONS_PER_QUESTION - 1 {
        return None;
    }
    let answer_index = answer_position.min(others.len());
    others.insert(answer_index, answer.to_string());
    let options = others;
    Some(json!({
        "question": question,
        "options": options,
        "answer_index": answer_index,
        "explanation": explanation,
    }))
}

/// The text the blank replaced, when the explanation quotes the full sentence.
fn cloze_answer<'a>(question: &str, explanation: &'a str) -> Option<&'a str> {
    let (before, after) = question.split_once(BLANK)?;
    let sentence = explanation
        .strip_prefix(EXPLANATION_PREFIX)
        .unwrap_or(explanation);
    let answer = sentence.strip_prefix(before)?.strip_suffix(after)?.trim();
    (!answer.is_empty()).then_some(answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::validator::{failure_reason, validate};
    use std::time::Instant;

    const PHOTOSYNTHESIS: &str = "Photosynthesis is the process by which green plants convert light energy into chemical energy. \
        The process takes place inside chloroplasts, which contain the green pigment chlorophyll. \
        Chlorophyll absorbs red and blue light most strongly and reflects green light. \
        During the light reactions, water molecules are split and oxygen is released as a byproduct. \
        The energy captured from light is stored temporarily in molecules of ATP and NADPH. \
        In the Calvin cycle, the enzyme RuBisCO fixes carbon dioxide from the atmosphere into sugar. \
        Plants use the resulting glucose to build cellulose and to fuel cellular respiration. \
        Without photosynthesis, almost all life on Earth would lack its primary source of energy.";

    const FRENCH_REVOLUTION: &str = "The French Revolution began in 1789 when a financial crisis and food shortages pushed France toward political upheaval. \
        King Louis XVI summoned the Estates General to raise taxes, but the Third Estate demanded a greater voice. \
        Its deputies declared themselves the National Assembly and swore the Tennis Court Oath. \
        On 14 July 1789, crowds in Paris stormed the Bastille, a royal fortress and prison. \
        The Assembly soon abolished feudal privileges and adopted the Declaration of the Rights of Man. \
        Radical Jacobins led by Maximilien Robespierre later seized control of the government. \
        During the Reign of Terror, thousands of suspected enemies of the revolution were executed by guillotine. \
        The revolution ended the absolute monarchy and spread ideas of liberty and equality across Europe.";

    const TCP_CONGESTION: &str = "TCP congestion control prevents a sender from overwhelming the network with more packets than it can carry. \
        Each sender maintains a congestion window that limits how much unacknowledged data may be in flight. \
        During slow start, the congestion window doubles every round trip until packet loss occurs or a threshold is reached. \
        After the threshold, the sender switches to congestion avoidance and grows the window linearly. \
        When the sender detects packet loss through three duplicate acknowledgements, it performs a fast retransmit. \
        A retransmission timeout signals severe congestion, so the window collapses back to a single segment. \
        Algorithms such as Reno and CUBIC differ in how aggressively they probe for available bandwidth. \
        Together these mechanisms let many connections share a network link fairly and efficiently.";

    const PARAGRAPHS: [&str; 3] = [PHOTOSYNTHESIS, FRENCH_REVOLUTION, TCP_CONGESTION];

    fn request(artifact_type: ArtifactType, content: &str, count: usize) -> GenerationRequest {
        GenerationRequest {
            artifact_type,
            content: content.to_string(),
            count,
        }
    }

    async fn produce(request: &GenerationRequest) -> Value {
        let generator = OfflineGenerator;
        let plan = generator
            .plan(request)
            .await
            .expect("offline planning succeeds");
        generator
            .generate(request, &plan)
            .await
            .expect("a fresh plan renders")
    }

    fn items<'a>(output: &'a Value, field: &str) -> &'a Vec<Value> {
        output[field]
            .as_array()
            .expect("validated output holds an array")
    }

    fn str_of<'a>(value: &'a Value, field: &str) -> &'a str {
        value[field]
            .as_str()
            .expect("validated output holds a string")
    }

    fn is_whole_word_at(text: &str, start: usize, len: usize) -> bool {
        let before = text[..start].chars().next_back();
        let after = text[start + len..].chars().next();
        !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric)
    }

    /// Checks that a question is its explanation's sentence with the answer, a whole word, blanked.
    fn assert_is_cloze(question: &Value, content: &str) {
        let sentence = str_of(question, "explanation")
            .strip_prefix(EXPLANATION_PREFIX)
            .expect("explanation quotes the sentence");
        assert!(
            content.contains(sentence),
            "not from the content: {sentence}"
        );
        let options: Vec<&str> = items(question, "options")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let answer = options[question["answer_index"].as_u64().expect("index") as usize];
        let text = str_of(question, "question");
        let blanked = sentence.match_indices(answer).any(|(at, _)| {
            is_whole_word_at(sentence, at, answer.len())
                && format!(
                    "{}{BLANK}{}",
                    &sentence[..at],
                    &sentence[at + answer.len()..]
                ) == text
        });
        assert!(
            blanked,
            "{text:?} is not {sentence:?} with {answer:?} blanked"
        );
        let mut lowered: Vec<String> = options.iter().map(|o| o.to_lowercase()).collect();
        lowered.sort();
        lowered.dedup();
        assert_eq!(
            lowered.len(),
            OPTIONS_PER_QUESTION,
            "options repeat: {options:?}"
        );
    }

    #[test]
    fn stopwords_are_sorted_for_binary_search() {
        assert!(STOPWORDS.windows(2).all(|pair| pair[0] < pair[1]));
    }

    #[test]
    fn artifact_type_round_trips_through_its_name() {
        for kind in [
            ArtifactType::Quiz,
            ArtifactType::Flashcards,
            ArtifactType::Summary,
        ] {
            assert_eq!(ArtifactType::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(ArtifactType::parse(" Quiz "), None);
        assert_eq!(ArtifactType::parse("essay"), None);
    }

    #[test]
    fn sentences_keep_punctuation_and_skip_fragments() {
        let text = "Plants need light to grow.  Do animals need\nlight too? Yes! Pi is 3.14 in most texts. The end result is growth";
        assert_eq!(
            split_sentences(text),
            vec![
                "Plants need light to grow.",
                "Do animals need light too?",
                "Pi is 3.14 in most texts.",
                "The end result is growth",
            ]
        );
    }

    #[test]
    fn key_terms_include_names_and_frequent_words_but_no_stopwords() {
        let analysis = analyze(FRENCH_REVOLUTION);
        let displays: Vec<&str> = analysis.terms.iter().map(|t| t.display.as_str()).collect();
        for expected in [
            "Tennis Court Oath",
            "Maximilien Robespierre",
            "National Assembly",
            "King Louis XVI",
            "revolution",
        ] {
            assert!(
                displays.contains(&expected),
                "{expected} missing from {displays:?}"
            );
        }
        assert_eq!(
            displays[0], "revolution",
            "the most frequent term ranks first"
        );
        assert!(displays.iter().all(|d| !is_stopword(d)), "{displays:?}");
    }

    #[tokio::test]
    async fn quizzes_are_valid_clozes_of_the_content() {
        let mut answer_positions = HashSet::new();
        for paragraph in PARAGRAPHS {
            let request = request(ArtifactType::Quiz, paragraph, 5);
            let output = produce(&request).await;
            assert_eq!(validate(&request, &output), Ok(()), "{output:#}");
            for question in items(&output, "questions") {
                assert_is_cloze(question, paragraph);
                answer_positions.insert(question["answer_index"].as_u64());
            }
        }
        assert!(
            answer_positions.len() > 1,
            "answers always sit at one position"
        );
    }

    #[tokio::test]
    async fn flashcards_are_valid_and_backs_explain_fronts() {
        for paragraph in PARAGRAPHS {
            let request = request(ArtifactType::Flashcards, paragraph, 5);
            let output = produce(&request).await;
            assert_eq!(validate(&request, &output), Ok(()), "{output:#}");
            for card in items(&output, "cards") {
                let (front, back) = (str_of(card, "front"), str_of(card, "back"));
                assert!(
                    paragraph.contains(back),
                    "back is not from the content: {back}"
                );
                let whole_word = back
                    .match_indices(front)
                    .any(|(at, _)| is_whole_word_at(back, at, front.len()));
                assert!(whole_word, "{back:?} does not contain {front:?}");
            }
        }
    }

    #[tokio::test]
    async fn summaries_are_valid_central_sentences_in_order() {
        for paragraph in PARAGRAPHS {
            let request = request(ArtifactType::Summary, paragraph, 3);
            let output = produce(&request).await;
            assert_eq!(validate(&request, &output), Ok(()), "{output:#}");
            let points: Vec<&str> = items(&output, "key_points")
                .iter()
                .filter_map(Value::as_str)
                .collect();
            assert_eq!(points.len(), 3);
            let positions: Vec<usize> = points
                .iter()
                .map(|p| paragraph.find(p).expect("point is a sentence"))
                .collect();
            assert!(
                positions.windows(2).all(|w| w[0] < w[1]),
                "key points out of order"
            );
            let summary = str_of(&output, "summary");
            let sentences = split_sentences(summary);
            assert!(
                (1..=MAX_SUMMARY_SENTENCES).contains(&sentences.len()),
                "{summary}"
            );
            assert!(
                sentences.iter().all(|s| paragraph.contains(s.as_str())),
                "{summary}"
            );
        }
    }

    #[tokio::test]
    async fn output_is_deterministic() {
        for kind in [
            ArtifactType::Quiz,
            ArtifactType::Flashcards,
            ArtifactType::Summary,
        ] {
            for paragraph in PARAGRAPHS {
                let request = request(kind, paragraph, 5);
                assert_eq!(produce(&request).await, produce(&request).await);
            }
        }
    }

    #[tokio::test]
    async fn sentences_differing_only_in_the_answer_do_not_repeat_a_question() {
        let content = "We can see a rabbit here. We can see a badger here. \
            Foxes hunt mice near hedges. Owls fly over quiet meadows.";
        let request = request(ArtifactType::Quiz, content, 4);
        let output = produce(&request).await;
        let questions: Vec<&str> = items(&output, "questions")
            .iter()
            .map(|q| str_of(q, "question"))
            .collect();
        let distinct: HashSet<&str> = questions.iter().copied().collect();
        assert!(questions.len() >= 3, "{questions:?}");
        assert_eq!(distinct.len(), questions.len(), "{questions:?}");
    }

    #[tokio::test]
    async fn thin_content_still_fails_after_repairs_with_a_helpful_reason() {
        let generator = OfflineGenerator;
        let request = request(ArtifactType::Quiz, "Create quiz on cells", 5);
        let plan = generator.plan(&request).await.expect("plan");
        let mut output = generator.generate(&request, &plan).await.expect("generate");
        let mut result = validate(&request, &output);
        for _ in 0..2 {
            let Err(errors) = &result else { break };
            output = generator
                .repair(&request, &plan, &output, errors)
                .await
                .expect("repair");
            result = validate(&request, &output);
        }
        let errors = result.expect_err("one short sentence cannot yield 5 questions");
        let reason = failure_reason(&request, &errors);
        assert!(reason.starts_with("expected 5 questions, got"), "{reason}");
        assert!(
            reason.contains("send source text, or configure an LLM generator"),
            "{reason}"
        );
    }

    #[tokio::test]
    async fn empty_content_gives_an_empty_summary_that_fails_validation() {
        let request = request(ArtifactType::Summary, "   ", 5);
        let output = produce(&request).await;
        assert_eq!(output, json!({"summary": "", "key_points": []}));
        assert!(validate(&request, &output).is_err());
    }

    #[tokio::test]
    async fn repair_fixes_duplicates_answer_index_and_repeated_options() {
        let generator = OfflineGenerator;
        let request = request(ArtifactType::Quiz, PHOTOSYNTHESIS, 5);
        let plan = generator.plan(&request).await.expect("plan");
        let mut output = generator.generate(&request, &plan).await.expect("generate");
        let questions = output["questions"].as_array_mut().expect("questions");
        questions[1] = questions[0].clone();
        questions[2]["answer_index"] = json!(9);
        let answer_index = questions[3]["answer_index"].as_u64().expect("index") as usize;
        let answer = questions[3]["options"][answer_index]
            .as_str()
            .expect("answer")
            .to_uppercase();
        questions[3]["options"][(answer_index + 1) % OPTIONS_PER_QUESTION] = json!(answer);
        let errors = validate(&request, &output).expect_err("output was broken on purpose");
        assert_eq!(errors.len(), 3, "{errors:?}");

        let repaired = generator
            .repair(&request, &plan, &output, &errors)
            .await
            .expect("repair");
        assert_eq!(validate(&request, &repaired), Ok(()), "{repaired:#}");
        for question in items(&repaired, "questions") {
            assert_is_cloze(question, PHOTOSYNTHESIS);
        }
    }

    #[tokio::test]
    async fn repair_fixes_flashcards_and_summaries() {
        let generator = OfflineGenerator;
        for (kind, field) in [
            (ArtifactType::Flashcards, "cards"),
            (ArtifactType::Summary, "summary"),
        ] {
            let request = request(kind, TCP_CONGESTION, 5);
            let plan = generator.plan(&request).await.expect("plan");
            let mut output = generator.generate(&request, &plan).await.expect("generate");
            if kind == ArtifactType::Flashcards {
                let cards = output[field].as_array_mut().expect("cards");
                cards[1] = cards[0].clone();
                cards[2]["back"] = json!("  ");
            } else {
                output[field] = json!("");
            }
            let errors = validate(&request, &output).expect_err("output was broken on purpose");
            let repaired = generator
                .repair(&request, &plan, &output, &errors)
                .await
                .expect("repair");
            assert_eq!(validate(&request, &repaired), Ok(()), "{repaired:#}");
        }
    }

    #[tokio::test]
    async fn generate_rejects_a_plan_for_another_artifact_or_a_malformed_one() {
        let generator = OfflineGenerator;
        let quiz = request(ArtifactType::Quiz, PHOTOSYNTHESIS, 5);
        let summary = request(ArtifactType::Summary, PHOTOSYNTHESIS, 5);
        let summary_plan = generator.plan(&summary).await.expect("plan");
        assert!(generator.generate(&quiz, &summary_plan).await.is_err());
        let mut quiz_plan = generator.plan(&quiz).await.expect("plan");
        quiz_plan["items"][0]["answer_start"] = json!(100_000);
        assert!(generator.generate(&quiz, &quiz_plan).await.is_err());
    }

    #[tokio::test]
    async fn odd_inputs_never_panic_and_any_questions_stay_well_formed() {
        let inputs = [
            "",
            "...!!!???",
            ". . . ! ?",
            "Ünïcødé İstanbul straße grüße. Ещё одно длинное предложение здесь. 日本語の文章です。 Émile Zola wrote many novels about Parisian society.",
            "🙂🙂 emoji emoji emoji emoji. -- - -- -. a-b-c d-e-f g-h-i j-k-l.",
            "word word word word word word word word. word word word word word.",
        ];
        for content in inputs {
            for kind in [
                ArtifactType::Quiz,
                ArtifactType::Flashcards,
                ArtifactType::Summary,
            ] {
                let request = request(kind, content, 5);
                let output = produce(&request).await;
                if kind == ArtifactType::Quiz {
                    for question in items(&output, "questions") {
                        assert_is_cloze(question, content);
                    }
                }
            }
        }
    }

    #[tokio::test]
    async fn large_content_is_handled_quickly() {
        let mut content = String::new();
        let mut trial = 0;
        while content.len() < 100_000 {
            for paragraph in PARAGRAPHS {
                content.push_str(&paragraph.replace(". ", &format!(" in trial {trial}. ")));
                content.push(' ');
            }
            trial += 1;
        }
        let started = Instant::now();
        for kind in [
            ArtifactType::Quiz,
            ArtifactType::Flashcards,
            ArtifactType::Summary,
        ] {
            let request = request(kind, &content, 20);
            let output = produce(&request).await;
            assert_eq!(validate(&request, &output), Ok(()));
        }
        // Generous for unoptimised test builds; release builds take a few milliseconds.
        assert!(
            started.elapsed().as_secs() < 5,
            "took {:?}",
            started.elapsed()
        );
    }
}
