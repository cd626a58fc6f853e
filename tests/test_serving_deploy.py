"""The deployment files users edit parse as TF Serving's own config protos and agree with the README."""
from __future__ import annotations

import os

import pytest

DEPLOY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "serving", "deploy")


def _read(name: str) -> str:
    with open(os.path.join(DEPLOY, name), encoding="utf-8") as f:
        return f.read()


def _batching_parameters_class():
    """tensorflow_serving's BatchingParameters (session_bundle_config.proto; not shipped in the pip
    package), rebuilt from its field list so text_format rejects unknown or mistyped fields."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from google.protobuf import wrappers_pb2  # noqa: F401 - registers google/protobuf/wrappers.proto

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(
        name="ctrkit_test_batching.proto", package="ctrkit_test", syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    msg = fdp.message_type.add(name="BatchingParameters")
    for number, (name, wrapper) in enumerate(
        [("max_batch_size", "Int64Value"), ("batch_timeout_micros", "Int64Value"),
         ("max_enqueued_batches", "Int64Value"), ("num_batch_threads", "Int64Value"),
         ("thread_pool_name", "StringValue")], start=1):
        msg.field.add(name=name, number=number, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                      type_name=f".google.protobuf.{wrapper}")
    msg.field.add(name="allowed_batch_sizes", number=6, type=F.TYPE_INT64, label=F.LABEL_REPEATED)
    msg.field.add(name="pad_variable_length_inputs", number=7, type=F.TYPE_BOOL, label=F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(descriptor_pb2.FileDescriptorProto.FromString(
        descriptor_pool.Default().FindFileByName("google/protobuf/wrappers.proto").serialized_pb))
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("ctrkit_test.BatchingParameters"))


def test_models_config_is_a_model_server_config():
    pytest.importorskip("tensorflow_serving")
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    cfg = text_format.Parse(_read("models.config"), model_server_config_pb2.ModelServerConfig())
    (model,) = cfg.model_config_list.config
    assert model.model_platform == "tensorflow"
    assert model.base_path == f"/models/{model.name}"  # where the README's docker command mounts BASE
    assert model.model_version_policy.WhichOneof("policy_choice") == "latest"
    assert model.model_version_policy.latest.num_versions >= 1


def test_batching_config_is_valid_batching_parameters():
    from google.protobuf import text_format

    params = text_format.Parse(_read("batching.config"), _batching_parameters_class()())
    sizes = list(params.allowed_batch_sizes)
    assert sizes == sorted(sizes) and sizes[-1] == params.max_batch_size.value  # TF Serving's requirements
    assert params.num_batch_threads.value >= 1 and params.batch_timeout_micros.value > 0


def test_readme_docker_command_uses_the_shipped_files():
    readme = _read("README.md")
    # Shell commands with their backslash-continued lines joined.
    joined = readme.replace("\\\n", " ")
    commands = [line for line in joined.splitlines() if line.startswith("docker run") and "tensorflow/serving" in line]
    assert commands, "no docker run tensorflow/serving command in the README"
    full = next(c for c in commands if "model_config_file" in c)
    for flag in ("--model_config_file=/config/models.config", "--batching_parameters_file=/config/batching.config",
                 "--enable_batching=true", "-p 8501:8501", "-p 8500:8500"):
        assert flag in full
    assert "serving/deploy/models.config:/config/models.config" in full
    for api in (":predict", ":classify", ":regress", "/metadata", "PredictRequest", "ClassificationRequest"):
        assert api in readme
