//! DC-AE (diffusers `AutoencoderDC`): arrives with its issue.
