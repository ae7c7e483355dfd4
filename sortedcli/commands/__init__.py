"""One plain function per verb: ``run(cfg, ...)``. Tests call them with a composed config."""
