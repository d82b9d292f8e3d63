"""The bundled synthetic data: scenes of coloured shapes with captions, planted defects and a
labelled evaluation split. `scenes` renders (public: `random_scene`, `render`, `encode`), `corpus`
writes the training corpus and the evaluation split, `vocab` is the plain-data vocabulary."""
