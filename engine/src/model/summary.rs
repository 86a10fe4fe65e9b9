//! A one-screen summary of a model.
