#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    synchrony::fuzzing::contain_panics_as_the_engine_does();
    synchrony::fuzzing::awareness_json(data)
});
