"""One module per decomposition family; each states its math and draws its replacement chain."""
