//! QR codes of client configurations as PNG (`core export_client`). `phantom-api --qr` draws
//! its own for the terminal.

use qrcode::{EcLevel, QrCode};

/// Why a configuration could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum QrError {
    /// The text does not fit a QR code.
    #[error("cannot encode a QR code: {0}")]
    Encode(#[source] qrcode::types::QrError),
    #[error("PNG: {0}")]
    Png(#[source] png::EncodingError),
}

fn code(text: &str) -> Result<QrCode, QrError> {
    // Medium error correction still fits a full wg-quick config in a version the phone
    // cameras read easily.
    QrCode::with_error_correction_level(text.as_bytes(), EcLevel::M).map_err(QrError::Encode)
}

/// The code as a grayscale PNG, `scale` pixels per module, with a 4-module quiet zone.
pub fn png(text: &str, scale: u32) -> Result<Vec<u8>, QrError> {
    let code = code(text)?;
    let width = code.width() as u32;
    let colors = code.to_colors();
    let quiet = 4;
    let side = (width + 2 * quiet) * scale;
    let mut pixels = vec![255u8; (side * side) as usize];
    for y in 0..width {
        for x in 0..width {
            if colors[(y * width + x) as usize] == qrcode::Color::Dark {
                for dy in 0..scale {
                    let row = ((y + quiet) * scale + dy) * side;
                    let start = (row + (x + quiet) * scale) as usize;
                    pixels[start..start + scale as usize].fill(0);
                }
            }
        }
    }
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, side, side);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(QrError::Png)?;
        writer.write_image_data(&pixels).map_err(QrError::Png)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_png() -> Result<(), QrError> {
        let png = png("[Interface]\nPrivateKey = x\n", 4)?;
        assert_eq!(&png[1..4], b"PNG");
        Ok(())
    }
}
