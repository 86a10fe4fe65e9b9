//! The `quant-studio` program as a library: the command line (`cli`) and the desktop window (`gui`), so the
//! binary stays a thin `main` and the GUI tests under `tests/` can drive the real app.

pub mod cli;
pub mod gui;
