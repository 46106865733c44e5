"""jobs/pretokenize.py logs its run to a real MLflow tracking server."""

from jobs.pretokenize import main


def test_job_logs_params_metrics_and_manifest(ray_local, mlflow_server, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    argv = [
        "--input",
        "samples/images",
        "--output",
        str(out),
        "--tokenizer",
        "preset:tiny",
        "--mlflow-uri",
        mlflow_server,
        "--mlflow-experiment",
        "pretok-test",
        "--set",
        "filters.min_side=300",
    ]
    assert main(argv) == 0
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("pretok-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["filters.min_side"] == "300" and run.data.params["tokenizer"] == "preset:tiny"
    m = run.data.metrics
    # the bundled photos are 256 px on the short side: every one is too small for min_side=300
    assert (m["samples"], m["kept"], m["rejected"], m["rejected.too_small"]) == (4, 0, 4, 4)
    assert m["samples_per_s"] > 0
    assert run.data.tags["tokenizer_id"]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["manifest.json"]

    # a rerun has nothing to do and logs nothing
    assert main(argv) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert len(client.search_runs([exp.experiment_id])) == 1
