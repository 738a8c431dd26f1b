#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| artifact_events::fuzz_checks::event_data(input));
