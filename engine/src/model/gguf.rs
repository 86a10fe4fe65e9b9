//! (in progress)
pub fn open(_p: &std::path::Path) -> crate::Result<super::SourceModel> { unimplemented!() }
