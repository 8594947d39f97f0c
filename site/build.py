#!/usr/bin/env python3
"""Prepares the databases the site serves (run by `make site`; safe to run again):

- stores the training log of each model directory given (its archaeclip_training.json, written
  by clip_train) in the collection database, as the tables training_runs, training_log and
  evaluations (the final held-out evaluation; evaluation.txt's numbers);
- creates the small writable database for saved searches if it does not exist (empty: the
  plugin creates its tables at startup).

    python3 site/build.py dist/demo.db dist/site.db models/archaeclip-demo [more model dirs]

Plain sqlite3: nothing here needs the extension.
"""
import argparse
import json
import os
import sqlite3

TRAINING_SCHEMA = """
CREATE TABLE IF NOT EXISTS training_runs(
  id INTEGER PRIMARY KEY, model TEXT UNIQUE, base_model TEXT, statement TEXT, rows INTEGER,
  total_steps INTEGER, epochs INTEGER, batch_size INTEGER, lr REAL, elapsed_s REAL,
  finished INTEGER, options TEXT);
CREATE TABLE IF NOT EXISTS training_log(
  run_id INTEGER REFERENCES training_runs(id), step INTEGER, epoch INTEGER, kind TEXT,
  loss REAL, lr REAL, logit_scale REAL, examples INTEGER, examples_per_s REAL, elapsed_s REAL,
  detail TEXT);
CREATE INDEX IF NOT EXISTS training_log_run ON training_log(run_id, step);
CREATE TABLE IF NOT EXISTS evaluations(
  run_id INTEGER REFERENCES training_runs(id), direction TEXT, pairs INTEGER,
  recall_at_1 REAL, recall_at_5 REAL, recall_at_10 REAL, median_rank REAL, mean_rank REAL);
"""


def store_training_log(db, model_dir):
    path = os.path.join(model_dir, "archaeclip_training.json")
    with open(path) as f:
        run = json.load(f)
    model = os.path.basename(os.path.normpath(model_dir))
    options = run.get("options", {})
    old = db.execute("SELECT id FROM training_runs WHERE model = ?", (model,)).fetchone()
    if old:  # a run stored again keeps its id (links to it stay valid)
        db.execute("DELETE FROM training_log WHERE run_id = ?", old)
        db.execute("DELETE FROM evaluations WHERE run_id = ?", old)
        db.execute("DELETE FROM training_runs WHERE id = ?", old)
    run_id = db.execute(
        "INSERT INTO training_runs(id, model, base_model, statement, rows, total_steps, epochs, batch_size,"
        " lr, elapsed_s, finished, options) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (old[0] if old else None, model, os.path.basename(run.get("base_model") or ""), run.get("statement"), run.get("rows"),
         run.get("total_steps"), options.get("epochs"), options.get("batch_size"), options.get("lr"),
         run.get("state", {}).get("elapsed_s"), int(bool(run.get("state", {}).get("finished"))),
         json.dumps(options)),
    ).lastrowid
    db.executemany(
        "INSERT INTO training_log VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(run_id, r.get("step"), r.get("epoch"), r.get("kind"), r.get("loss"), r.get("lr"),
          r.get("logit_scale"), r.get("examples"), r.get("examples_per_s"), r.get("elapsed_s"),
          json.dumps(r.get("detail"))) for r in run.get("log", [])],
    )
    for direction, e in (run.get("last_eval") or {}).items():
        db.execute(
            "INSERT INTO evaluations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (run_id, direction, e.get("pairs"), e.get("recall_at_1"), e.get("recall_at_5"),
             e.get("recall_at_10"), e.get("median_rank"), e.get("mean_rank")),
        )
    return model, len(run.get("log", []))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("collection")
    ap.add_argument("saved")
    ap.add_argument("models", nargs="*")
    args = ap.parse_args()
    db = sqlite3.connect(args.collection)
    db.executescript(TRAINING_SCHEMA)
    for model_dir in args.models:
        model, n = store_training_log(db, model_dir)
        print(f"{args.collection}: training log of {model} ({n} rows)")
    db.commit()
    db.close()
    sqlite3.connect(args.saved).close()  # the plugin creates its tables when the site starts


if __name__ == "__main__":
    main()
