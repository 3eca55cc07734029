from megatron_ext.verify.runner import main

raise SystemExit(main())
