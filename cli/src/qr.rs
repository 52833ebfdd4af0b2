//! `--qr`: a client configuration drawn as a QR code for a terminal.

use qrcode::{EcLevel, QrCode, render::unicode};

/// The code drawn with half-block characters, two modules per character cell. Medium error
/// correction, as the daemon's PNG, still fits a full wg-quick config in a version phone
/// cameras read easily.
pub fn terminal(text: &str) -> Result<String, String> {
    let code = QrCode::with_error_correction_level(text.as_bytes(), EcLevel::M)
        .map_err(|e| format!("cannot encode a QR code: {e}"))?;
    Ok(code
        .render::<unicode::Dense1x2>()
        .dark_color(unicode::Dense1x2::Light)
        .light_color(unicode::Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_half_blocks() -> Result<(), String> {
        let code = terminal("[Interface]\nPrivateKey = x\n")?;
        assert!(code.contains('\u{2580}') || code.contains('\u{2584}'));
        Ok(())
    }
}
