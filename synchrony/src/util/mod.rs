//! Small helpers every layer may use; nothing here imports the rest of the engine.

pub mod clock;
