"""Analysis of steering vectors: similarity between vector sets (`similarity`), their
decomposition onto SAE features (`sae`, the only place sae-lens is imported) and the
attribution of the target-layer change they cause (`attribution`).

Nothing is imported here, so `import melbo_lens.analysis` stays light."""
