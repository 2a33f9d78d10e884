"""Evaluation as RefSR papers report it: ``metrics`` (Y-channel PSNR and SSIM, the MATLAB protocol) and
``evaluate`` (a model on a test set, per reference level; loading a trained model; super-resolving)."""
