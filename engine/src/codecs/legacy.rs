//! Legacy 32-element blocks: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.
pub fn dequant_q4_0(_s: &[u8], _d: &mut [f32]) { unimplemented!() }
pub fn dequant_q4_1(_s: &[u8], _d: &mut [f32]) { unimplemented!() }
pub fn dequant_q5_0(_s: &[u8], _d: &mut [f32]) { unimplemented!() }
pub fn dequant_q5_1(_s: &[u8], _d: &mut [f32]) { unimplemented!() }
pub fn dequant_q8_0(_s: &[u8], _d: &mut [f32]) { unimplemented!() }
