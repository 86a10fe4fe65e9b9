//! K-quants: 256-element super-blocks.
pub fn dequant_q2_k(_s: &[u8], _d: &mut [f32]) { unimplemented!() }
pub fn dequant_q3_k(_s: &[u8], _d: &mut [f32]) { unimplemented!() }
pub fn dequant_q4_k(_s: &[u8], _d: &mut [f32]) { unimplemented!() }
pub fn dequant_q5_k(_s: &[u8], _d: &mut [f32]) { unimplemented!() }
pub fn dequant_q6_k(_s: &[u8], _d: &mut [f32]) { unimplemented!() }
