"""Ways to make steering vectors: MELBO vectors (`melbo`) and adapters (`adapters`),
supervised vectors from contrast pairs (`supervised`), and baselines (`baselines`), built
on pure objective and constraint functions (`objectives`, `constraints`)."""
