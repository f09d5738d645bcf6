"""A stand-in for the client ``omero.scripts.client(...)`` gives a script when OMERO runs it.

On the server, a job's inputs and outputs live in the session's shared
memory (``ISession.getInputs`` / ``setOutput``), which omero-py's
``BaseClient`` reaches through ``_env``.  :class:`ScriptClient` keeps
omero-py's own ``getInputs``, ``getInput``, ``setOutput``, ``getOutput`` and
``_env`` (unchanged) and stands in only for the session: inputs are rtypes,
outputs must be rtypes, and, as the server does before it starts a job, the
inputs are checked against the script's declared parameters with omero-py's
``omero.scripts.validate_inputs`` (missing required inputs, values outside
the declared choices, wrong types): a job whose inputs fail never starts
(``omero.ValidationException``).
"""

from __future__ import annotations

from typing import Any

import omero
import omero.clients
import omero.scripts
from omero.rtypes import rbool, rdouble, rint, rlist, rlong, rstring, wrap

_MAKERS = (
    (omero.RLong, rlong),
    (omero.RInt, rint),
    (omero.RString, rstring),
    (omero.RBool, rbool),
    (omero.RDouble, rdouble),
)


def _typed(value: Any, prototype: Any) -> Any:
    """A plain value as OMERO.web submits it for a parameter: in the rtype the parameter declares."""
    if isinstance(value, omero.RType):
        return value
    if isinstance(prototype, omero.RList) and isinstance(value, list | tuple):
        element = prototype.val[0] if prototype.val else None
        return rlist([_typed(v, element) for v in value])
    for kind, make in _MAKERS:
        if isinstance(prototype, kind):
            try:
                return make(value)
            except (TypeError, ValueError):
                break
    return wrap(value)  # of the wrong type: validate_inputs says so, as the server would


class _SessionService:
    def __init__(self, inputs: dict[str, Any]):
        self.inputs = inputs
        self.outputs: dict[str, Any] = {}

    def getInputs(self, uuid):
        return dict(self.inputs)

    def getInput(self, uuid, key):
        return self.inputs.get(key)

    def getInputKeys(self, uuid):
        return list(self.inputs)

    def setOutput(self, uuid, key, value):
        if value is not None and not isinstance(value, omero.RType):
            # Ice marshals only omero.RType values into the session's memory
            raise TypeError(f"output {key!r} must be an omero.RType, not {type(value).__name__}")
        self.outputs[key] = value

    def getOutput(self, uuid, key):
        return self.outputs.get(key)


class _Session:
    def __init__(self, service: _SessionService):
        self.service = service

    def getSessionService(self):
        return self.service

    def detachOnDestroy(self):
        pass


class ScriptClient:
    """What ``omero.scripts.client(..., client=ScriptClient(inputs))`` needs, and what the script then calls.

    ``inputs``: plain values or rtypes; plain ones are submitted in the rtype their parameter
    declares (a List of Long gets an rlist of rlong), as OMERO.web does.
    After the run, :attr:`outputs` holds what the script set (rtypes) and :attr:`closed` whether
    it closed its session.
    """

    _env = omero.clients.BaseClient._env
    getInputs = omero.clients.BaseClient.getInputs
    getInput = omero.clients.BaseClient.getInput
    setOutput = omero.clients.BaseClient.setOutput
    getOutput = omero.clients.BaseClient.getOutput

    def __init__(self, inputs: dict[str, Any]):
        self.inputs = dict(inputs)
        self.submitted: dict[str, Any] = {}
        self.params = None
        self.agent = None
        self.closed = False
        self._service: _SessionService | None = None
        self._session: _Session | None = None

    def setAgent(self, agent):
        self.agent = agent

    def getProperty(self, key):
        return ""  # not "omero.scripts.parse": this is a job, not a parse

    def createSession(self, *args):
        if self.params is None:
            raise omero.ClientError("omero.scripts.client() sets the parameters before the session")
        declared = self.params.inputs
        self.submitted = {k: _typed(v, getattr(declared.get(k), "prototype", None)) for k, v in self.inputs.items()}
        errors = omero.scripts.validate_inputs(self.params, self.submitted)
        if errors:
            raise omero.ValidationException(message=f"invalid inputs: {errors}")
        self._service = _SessionService(self.submitted)
        self._session = _Session(self._service)
        return self._session

    def getSession(self, blocking=True):
        return self._session

    def getSessionId(self):
        return "script-session"

    def closeSession(self):
        self.closed = True
        self._session = None

    @property
    def outputs(self) -> dict[str, Any]:
        return {} if self._service is None else dict(self._service.outputs)
