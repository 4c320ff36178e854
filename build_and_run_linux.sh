#!/usr/bin/env bash
# Build the hcx-server Docker image and run it on this machine (Linux).
#
#   ./build_and_run_linux.sh                      # GPU if Docker can use one, else CPU
#   ./build_and_run_linux.sh --port 8080 --cpu
#   ./build_and_run_linux.sh --base-image nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
#
# Steps: check Docker -> read .env (created from .env.example if missing) -> create
# HOST_MODEL_DIR -> detect an NVIDIA GPU usable by Docker (else CPU, with a notice) ->
# build -> replace any old container -> run, published on 127.0.0.1 only -> wait for
# /health (the first run downloads the model, ~7.3 GB) -> print the URLs and the Caret
# MCP config. build_and_run_windows.ps1 is the same script for Windows; keep them parallel.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONTAINER_PORT=8000
APP_UID=1000 # the image's non-root user (Dockerfile APP_UID)
APP_GID=1000

IMAGE="hcx-server:latest"
CONTAINER="hcx-server"
ENV_FILE="$SCRIPT_DIR/.env"
BASE_IMAGE=""
PORT_OPT=""
NETWORK="${DOCKER_NETWORK:-}"
GPU_MODE="auto" # auto | cpu | gpu
DO_BUILD=1
BUILD_ONLY=0
DRY_RUN=0
WAIT_TIMEOUT=3600
BUILD_ARGS=()

usage() {
    cat <<EOF
Usage: $(basename "$0") [options]

Build the hcx-server image and run it, published on 127.0.0.1 only.

Options:
  -i, --image NAME         image name (default: hcx-server:latest)
  -p, --port PORT          host port (default: PORT from the .env file, else 8000)
  -b, --base-image IMAGE   alternative base image (Dockerfile build arg BASE_IMAGE), e.g.
                           nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
  -n, --name NAME          container name (default: hcx-server)
  -e, --env-file FILE      settings file (default: .env beside this script; created from
                           .env.example when missing)
      --cpu                run on the CPU even if a GPU is usable
      --gpu                require a GPU (fail instead of falling back to the CPU)
      --build-arg KEY=VAL  extra docker build argument (repeatable), e.g.
                           TORCH_REQUIREMENT=..., PIP_EXTRA_ARGS=..., INSTALL_REMOTE_CODE_DEPS=0,
                           INSTALL_COMPILER=0
      --no-build           run the existing image without building it
      --build-only         build the image, then stop (no container is started)
      --network host       build and run with host networking (env DOCKER_NETWORK=host): no
                           port publishing; the server itself listens on 127.0.0.1:PORT
      --wait-timeout SEC   how long to wait for /health (default: 3600; 0: do not wait)
      --dry-run            print the docker commands instead of running them
  -h, --help               this help
EOF
}

say() { printf '%s\n' "$*"; }
step() { printf '\n==> %s\n' "$*"; }
notice() { printf 'NOTICE: %s\n' "$*"; }
die() {
    printf 'ERROR: %s\n' "$*" >&2
    exit 1
}

need_value() {
    if [ "$#" -lt 2 ] || [ -z "$2" ]; then die "option $1 needs a value (see --help)"; fi
}

while [ "$#" -gt 0 ]; do
    case "$1" in
        -i | --image) need_value "$@"; IMAGE="$2"; shift 2 ;;
        -p | --port) need_value "$@"; PORT_OPT="$2"; shift 2 ;;
        -b | --base-image) need_value "$@"; BASE_IMAGE="$2"; shift 2 ;;
        -n | --name) need_value "$@"; CONTAINER="$2"; shift 2 ;;
        -e | --env-file) need_value "$@"; ENV_FILE="$2"; shift 2 ;;
        --cpu) GPU_MODE="cpu"; shift ;;
        --gpu) GPU_MODE="gpu"; shift ;;
        --build-arg) need_value "$@"; BUILD_ARGS+=(--build-arg "$2"); shift 2 ;;
        --no-build) DO_BUILD=0; shift ;;
        --build-only) BUILD_ONLY=1; shift ;;
        --network) need_value "$@"; NETWORK="$2"; shift 2 ;;
        --wait-timeout) need_value "$@"; WAIT_TIMEOUT="$2"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
done

case "$NETWORK" in
    "" | default | bridge) NETWORK="" ;;
    host) ;;
    *) die "--network: only 'host' is supported (got '$NETWORK')" ;;
esac
[[ "$WAIT_TIMEOUT" =~ ^[0-9]+$ ]] || die "--wait-timeout must be a number of seconds (got '$WAIT_TIMEOUT')"

# Print (dry run) or run a docker command.
run() {
    if [ "$DRY_RUN" = 1 ]; then
        printf '+'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

# --- 1. Docker ------------------------------------------------------------------------
step "Checking Docker"
if ! command -v docker >/dev/null 2>&1; then
    [ "$DRY_RUN" = 1 ] || die "Docker is not installed (no 'docker' command). Install Docker Engine: https://docs.docker.com/engine/install/"
fi
if [ "$DRY_RUN" = 0 ]; then
    if ! docker_err="$(timeout 30 docker info 2>&1 >/dev/null)"; then
        say "$docker_err" | tail -n 3 >&2
        die "Docker is installed but the daemon does not answer. Start it (e.g. 'sudo systemctl start docker') and make sure you may use it (member of the 'docker' group, or use sudo)."
    fi
    say "Docker $(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?') is running."
fi
HTTP_CLIENT=""
if command -v curl >/dev/null 2>&1; then
    HTTP_CLIENT=curl
elif command -v wget >/dev/null 2>&1; then
    HTTP_CLIENT=wget
elif [ "$WAIT_TIMEOUT" != 0 ]; then
    die "neither curl nor wget is installed: one is needed to wait for /health (or pass --wait-timeout 0)"
fi

# --- 2. Settings (.env) ---------------------------------------------------------------
step "Reading settings from $ENV_FILE"
ENV_DIR="$(cd "$(dirname "$ENV_FILE")" && pwd)" || die "folder of $ENV_FILE does not exist"
if [ ! -f "$ENV_FILE" ]; then
    if [ -f "$ENV_DIR/.env.example" ]; then
        cp "$ENV_DIR/.env.example" "$ENV_FILE"
        notice "created $ENV_FILE from .env.example; edit it to change settings (HUGGINGFACE_TOKEN, API_KEY, ...)"
    elif [ -f "$SCRIPT_DIR/.env.example" ]; then
        cp "$SCRIPT_DIR/.env.example" "$ENV_FILE"
        notice "created $ENV_FILE from $SCRIPT_DIR/.env.example; edit it to change settings"
    else
        notice "neither $ENV_FILE nor .env.example exists: using the defaults"
    fi
fi

# A .env is parsed, never sourced: KEY=VALUE lines, '#' comments, optional 'export ',
# optional single or double quotes around the value (as python-dotenv reads it).
ENV_KEYS=()
declare -A ENV_VALUES=()
if [ -f "$ENV_FILE" ]; then
    lineno=0
    while IFS= read -r line || [ -n "$line" ]; do
        lineno=$((lineno + 1))
        line="${line%$'\r'}"
        line="${line#"${line%%[![:space:]]*}"}"
        [ -z "$line" ] && continue
        [ "${line:0:1}" = "#" ] && continue
        line="${line#export }"
        if [[ "$line" != *=* ]]; then
            notice "$ENV_FILE:$lineno ignored (no KEY=VALUE)"
            continue
        fi
        key="${line%%=*}"
        key="${key%"${key##*[![:space:]]}"}"
        value="${line#*=}"
        value="${value#"${value%%[![:space:]]*}"}"
        if ! [[ "$key" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
            notice "$ENV_FILE:$lineno ignored (bad key '$key')"
            continue
        fi
        if [[ "$value" =~ ^\"(.*)\"[[:space:]]*(#.*)?$ ]] || [[ "$value" =~ ^\'(.*)\'[[:space:]]*(#.*)?$ ]]; then
            value="${BASH_REMATCH[1]}"
        else
            value="${value%%[[:space:]]#*}"
            value="${value%"${value##*[![:space:]]}"}"
        fi
        [ -z "${ENV_VALUES[$key]+set}" ] && ENV_KEYS+=("$key")
        ENV_VALUES[$key]="$value"
    done <"$ENV_FILE"
fi
env_get() { if [ -n "${ENV_VALUES[$1]+set}" ]; then printf '%s' "${ENV_VALUES[$1]}"; else printf '%s' "${2:-}"; fi; }

PORT="${PORT_OPT:-$(env_get PORT 8000)}"
PORT="${PORT:-8000}"
if ! [[ "$PORT" =~ ^[0-9]+$ ]] || [ "$PORT" -lt 1 ] || [ "$PORT" -gt 65535 ]; then
    die "PORT must be a number from 1 to 65535 (got '$PORT')"
fi

# Absolute path of a setting that may be relative to the .env file's folder.
abs_path() {
    local p="$1"
    local tilde="~"
    if [ "$p" = "$tilde" ]; then
        p="$HOME"
    elif [ "${p:0:2}" = "$tilde/" ]; then
        p="$HOME/${p:2}"
    fi
    [ "${p:0:1}" = "/" ] || p="$ENV_DIR/$p"
    realpath -m "$p"
}

HOST_MODEL_DIR="$(env_get HOST_MODEL_DIR ./models)"
HOST_MODEL_DIR="$(abs_path "${HOST_MODEL_DIR:-./models}")"

# MODEL_PATH as the container sees it: /models/... as is; a hub id as is (it is then
# cached in /models); a host path inside HOST_MODEL_DIR is translated to /models/...;
# anything else falls back to the image default (/models/HyperCLOVAX-SEED-Vision-Instruct-3B).
MODEL_PATH_IN=""
model_path="$(env_get MODEL_PATH)"
if [ -n "$model_path" ]; then
    if [[ "$model_path" == /models || "$model_path" == /models/* ]]; then
        MODEL_PATH_IN="$model_path"
    elif [[ "$model_path" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$ ]] && [ ! -e "$ENV_DIR/$model_path" ]; then
        MODEL_PATH_IN="$model_path"
    else
        host_model_path="$(abs_path "$model_path")"
        if [ "$host_model_path" = "$HOST_MODEL_DIR" ]; then
            MODEL_PATH_IN="/models"
        elif [[ "$host_model_path" == "$HOST_MODEL_DIR"/* ]]; then
            MODEL_PATH_IN="/models/${host_model_path#"$HOST_MODEL_DIR"/}"
        else
            notice "MODEL_PATH=$model_path is outside HOST_MODEL_DIR ($HOST_MODEL_DIR), which is the only host folder the container sees: using the image default /models/HyperCLOVAX-SEED-Vision-Instruct-3B"
        fi
    fi
fi
say "Port: $PORT (published on 127.0.0.1 only)"
say "Model folder on this machine: $HOST_MODEL_DIR (mounted at /models)"
say "MODEL_PATH in the container: ${MODEL_PATH_IN:-/models/HyperCLOVAX-SEED-Vision-Instruct-3B (default)}"

# --- 3. Model folder ------------------------------------------------------------------
RUN_USER=()
[ "$BUILD_ONLY" = 0 ] && step "Preparing the model folder"
if [ "$DRY_RUN" = 0 ] && [ "$BUILD_ONLY" = 0 ]; then
    created=0
    if [ ! -d "$HOST_MODEL_DIR" ]; then
        mkdir -p "$HOST_MODEL_DIR" || die "cannot create HOST_MODEL_DIR=$HOST_MODEL_DIR"
        created=1
        say "Created $HOST_MODEL_DIR"
    fi
    if [ "$(id -u)" -eq 0 ]; then
        # As root the container keeps the image's user (uid $APP_UID), which must be able
        # to write the model folder for the first download.
        if [ "$created" = 1 ] || [ -z "$(ls -A "$HOST_MODEL_DIR")" ]; then
            chown "$APP_UID:$APP_GID" "$HOST_MODEL_DIR"
        elif [ "$(stat -c %u "$HOST_MODEL_DIR")" != "$APP_UID" ]; then
            notice "$HOST_MODEL_DIR is not owned by uid $APP_UID (the container's user): if the model still has to be downloaded there, run: chown $APP_UID:$APP_GID '$HOST_MODEL_DIR'"
        fi
    fi
fi
if [ "$(id -u)" -ne 0 ]; then
    # Run as the calling user, so the downloaded files belong to you.
    RUN_USER=(--user "$(id -u):$(id -g)")
fi

# --- 4. GPU -----------------------------------------------------------------------------
USE_GPU=0
[ "$BUILD_ONLY" = 0 ] && step "Looking for an NVIDIA GPU"
if [ "$BUILD_ONLY" = 1 ]; then
    : # the image is the same for GPU and CPU
elif [ "$GPU_MODE" = cpu ]; then
    notice "--cpu given: running on the CPU."
elif command -v nvidia-smi >/dev/null 2>&1 && gpu_list="$(nvidia-smi -L 2>/dev/null)" && [ -n "$gpu_list" ]; then
    say "$gpu_list"
    USE_GPU=1 # confirmed with a test container after the build
else
    [ "$GPU_MODE" = gpu ] && die "--gpu given but no NVIDIA GPU was found (nvidia-smi -L)."
    notice "no NVIDIA GPU found (nvidia-smi -L): running on the CPU. This works but is slow (a few tokens per second)."
fi

# --- 5. Build -------------------------------------------------------------------------
NET_ARGS=()
[ "$NETWORK" = host ] && NET_ARGS=(--network host)
if [ "$DO_BUILD" = 1 ]; then
    step "Building image $IMAGE (the first build downloads several GB)"
    build_cmd=(docker build "${NET_ARGS[@]}" -t "$IMAGE")
    [ -n "$BASE_IMAGE" ] && build_cmd+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
    build_cmd+=("${BUILD_ARGS[@]}" "$SCRIPT_DIR")
    build_started=$SECONDS
    run "${build_cmd[@]}" || die "docker build failed (see above)"
    [ "$DRY_RUN" = 0 ] && say "Built $IMAGE in $((SECONDS - build_started))s."
else
    if [ "$DRY_RUN" = 0 ] && ! docker image inspect "$IMAGE" >/dev/null 2>&1; then
        die "--no-build given but image $IMAGE does not exist"
    fi
fi
if [ "$BUILD_ONLY" = 1 ]; then
    say "--build-only given: not starting a container."
    exit 0
fi

if [ "$USE_GPU" = 1 ]; then
    if [ "$DRY_RUN" = 1 ]; then
        run docker run --rm --network none --gpus all "$IMAGE" true
    elif ! gpu_err="$(docker run --rm --network none --gpus all "$IMAGE" true 2>&1)"; then
        say "$gpu_err" | tail -n 2
        [ "$GPU_MODE" = gpu ] && die "--gpu given but Docker cannot use the GPU: install the NVIDIA Container Toolkit and restart Docker."
        notice "an NVIDIA GPU is present but Docker cannot use it (install the NVIDIA Container Toolkit and restart Docker): running on the CPU."
        USE_GPU=0
    else
        say "Docker can use the GPU (--gpus all)."
    fi
fi

# --- 6. Run ---------------------------------------------------------------------------
step "Starting container $CONTAINER"
if [ "$DRY_RUN" = 0 ] && docker container inspect "$CONTAINER" >/dev/null 2>&1; then
    say "Removing the old container $CONTAINER"
    docker rm -f "$CONTAINER" >/dev/null
fi

# The container's settings: the .env without the keys set below, in a private temp file
# (docker's --env-file takes values verbatim, so the parsed values are written back).
ENV_TMP="$(mktemp)"
trap 'rm -f "$ENV_TMP"' EXIT
chmod 600 "$ENV_TMP"
for key in "${ENV_KEYS[@]}"; do
    case "$key" in
        HOST | PORT | HOST_MODEL_DIR | MODEL_PATH) continue ;;
    esac
    value="${ENV_VALUES[$key]}"
    if [[ "$value" == *$'\n'* ]]; then
        notice "$key has a multi-line value: not passed to the container"
        continue
    fi
    if [ "$key" = DEVICE ] && [ "$USE_GPU" = 0 ] && [[ "$value" == cuda* ]]; then
        notice "DEVICE=$value but no GPU is used: DEVICE=cpu in the container"
        value=cpu
    fi
    printf '%s=%s\n' "$key" "$value" >>"$ENV_TMP"
done

run_cmd=(docker run -d --name "$CONTAINER" --restart unless-stopped)
if [ "$NETWORK" = host ]; then
    # Host networking: -p would be ignored, so the server binds the loopback port itself.
    run_cmd+=(--network host -e HOST=127.0.0.1 -e "PORT=$PORT")
else
    run_cmd+=(-p "127.0.0.1:$PORT:$CONTAINER_PORT" -e HOST=0.0.0.0 -e "PORT=$CONTAINER_PORT")
fi
[ "$USE_GPU" = 1 ] && run_cmd+=(--gpus all)
run_cmd+=("${RUN_USER[@]}" -v "$HOST_MODEL_DIR:/models" --env-file "$ENV_TMP" -e HOST_MODEL_DIR=/models)
[ -n "$MODEL_PATH_IN" ] && run_cmd+=(-e "MODEL_PATH=$MODEL_PATH_IN")
run_cmd+=("$IMAGE")
if [ "$DRY_RUN" = 1 ]; then
    run "${run_cmd[@]}"
    # The env file's lines, secrets masked.
    sed -E 's/^([A-Za-z0-9_]*(TOKEN|KEY|SECRET|PASSWORD)[A-Za-z0-9_]*=).+/\1***/; s/^/  env-file: /' "$ENV_TMP"
    say "(dry run: nothing was started)"
    exit 0
fi
container_id="$("${run_cmd[@]}")" || die "docker run failed (see above)"
say "Started ${container_id:0:12} on $([ "$USE_GPU" = 1 ] && echo GPU || echo CPU)."

# --- 7. Wait for /health ----------------------------------------------------------------
BASE_URL="http://localhost:$PORT"
http_get() {
    if [ "$HTTP_CLIENT" = curl ]; then
        curl -s -m 5 "$1" 2>/dev/null || true
    else
        wget -q -T 5 -t 1 --content-on-error -O - "$1" 2>/dev/null || true
    fi
}
json_field() { sed -n "s/.*\"$1\"[[:space:]]*:[[:space:]]*\"\\([^\"]*\\)\".*/\\1/p" <<<"$2" | head -n 1; }

if [ "$WAIT_TIMEOUT" != 0 ]; then
    step "Waiting for $BASE_URL/health (up to ${WAIT_TIMEOUT}s; the first run downloads the model)"
    started=$SECONDS
    last_line=-1
    while :; do
        elapsed=$((SECONDS - started))
        state="$(docker inspect -f '{{.State.Status}} {{.RestartCount}}' "$CONTAINER" 2>/dev/null || echo 'gone 0')"
        if [ "${state%% *}" != running ] || [ "${state##* }" != 0 ]; then
            [ -t 1 ] && printf '\n'
            docker logs --tail 40 "$CONTAINER" 2>&1 || true
            die "the container stopped ($state) before it was ready; its last log lines are above."
        fi
        body="$(http_get "$BASE_URL/health" | tr -d '\n')"
        status="$(json_field status "$body")"
        if [ "$status" = ok ]; then
            [ -t 1 ] && printf '\n'
            say "Ready after ${elapsed}s."
            break
        fi
        if [ "$status" = error ]; then
            [ -t 1 ] && printf '\n'
            docker logs --tail 40 "$CONTAINER" 2>&1 || true
            die "the model failed to load: $(json_field error "$body"). Fix the setting, then run this script again."
        fi
        if [ "$elapsed" -ge "$WAIT_TIMEOUT" ]; then
            [ -t 1 ] && printf '\n'
            docker logs --tail 20 "$CONTAINER" 2>&1 || true
            die "not ready after ${WAIT_TIMEOUT}s (last /health: ${body:-no answer}). It keeps running: follow it with 'docker logs -f $CONTAINER'."
        fi
        size="$(du -sh "$HOST_MODEL_DIR" 2>/dev/null | cut -f1)"
        msg="  ${status:-starting}... ${elapsed}s, model folder ${size:-?}"
        if [ -t 1 ]; then
            printf '\r%-70s' "$msg"
        elif [ $((elapsed / 15)) != "$last_line" ]; then
            last_line=$((elapsed / 15))
            say "$msg"
        fi
        sleep 2
    done
fi

# --- 8. Done ----------------------------------------------------------------------------
step "hcx-server is running (container $CONTAINER, image $IMAGE, $([ "$USE_GPU" = 1 ] && echo GPU || echo CPU))"
cat <<EOF
  Health:      $BASE_URL/health
  REST (seed): POST $BASE_URL/tool/generate_hyperclovax_vision   {"prompt": "...", "image_base64": "..."}
  MCP:         $BASE_URL/mcp
  OpenAI API:  $BASE_URL/v1   (POST /v1/chat/completions, GET /v1/models)

Caret MCP config (paste into Caret's MCP settings):
{"mcpServers":{"hyperclovax":{"type":"streamableHttp","url":"$BASE_URL/mcp","timeout":300}}}

Logs: docker logs -f $CONTAINER    Stop: docker stop $CONTAINER    Remove: docker rm -f $CONTAINER
EOF
if [ -n "$(env_get API_KEY)" ]; then
    notice "API_KEY is set: clients must send it (Authorization: Bearer <API_KEY>)."
fi
