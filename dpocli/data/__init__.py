"""Stage 1's input: data files, Hub layouts, chat rows, validated examples and token ids. No torch."""
