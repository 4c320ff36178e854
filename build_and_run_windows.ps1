<#
.SYNOPSIS
    Build the hcx-server Docker image and run it on this machine (Windows, Docker Desktop).

.DESCRIPTION
    Steps: check Docker -> read .env (created from .env.example if missing) -> create
    HOST_MODEL_DIR -> detect an NVIDIA GPU usable by Docker (else CPU, with a notice) ->
    build -> replace any old container -> run, published on 127.0.0.1 only -> wait for
    /health (the first run downloads the model, ~7.3 GB) -> print the URLs and the Caret
    MCP config. build_and_run_linux.sh is the same script for Linux; keep them parallel.

    If scripts are blocked, run it as:
        powershell -ExecutionPolicy Bypass -File .\build_and_run_windows.ps1

.PARAMETER Image
    Image name (default: hcx-server:latest).
.PARAMETER Port
    Host port (default: PORT from the .env file, else 8000).
.PARAMETER BaseImage
    Alternative base image (Dockerfile build arg BASE_IMAGE), e.g.
    nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
.PARAMETER Name
    Container name (default: hcx-server).
.PARAMETER EnvFile
    Settings file (default: .env beside this script; created from .env.example when missing).
.PARAMETER Cpu
    Run on the CPU even if a GPU is usable.
.PARAMETER Gpu
    Require a GPU (fail instead of falling back to the CPU).
.PARAMETER BuildArg
    Extra docker build arguments KEY=VALUE, e.g. -BuildArg "INSTALL_REMOTE_CODE_DEPS=0".
.PARAMETER NoBuild
    Run the existing image without building it.
.PARAMETER BuildOnly
    Build the image, then stop (no container is started).
.PARAMETER Network
    "host": build and run with host networking (also env DOCKER_NETWORK=host); no port
    publishing, the server itself listens on 127.0.0.1:PORT.
.PARAMETER WaitTimeout
    How long to wait for /health, in seconds (default: 3600; 0: do not wait).
.PARAMETER DryRun
    Print the docker commands instead of running them.

.EXAMPLE
    .\build_and_run_windows.ps1
.EXAMPLE
    .\build_and_run_windows.ps1 -Port 8080 -Cpu
#>
[CmdletBinding()]
param(
    [string]$Image = "hcx-server:latest",
    [int]$Port = 0,
    [string]$BaseImage = "",
    [string]$Name = "hcx-server",
    [string]$EnvFile = "",
    [switch]$Cpu,
    [switch]$Gpu,
    [string[]]$BuildArg = @(),
    [switch]$NoBuild,
    [switch]$BuildOnly,
    [string]$Network = $env:DOCKER_NETWORK,
    [int]$WaitTimeout = 3600,
    [switch]$DryRun
)

# Native commands report failure through $LASTEXITCODE; "Continue" keeps Windows PowerShell
# 5.1 from turning their stderr lines into terminating errors.
$ErrorActionPreference = "Continue"
$ScriptDir = $PSScriptRoot
$ContainerPort = 8000
$DefaultModelPath = "/models/HyperCLOVAX-SEED-Vision-Instruct-3B"

function Say([string]$Text) { Write-Host $Text }
function Step([string]$Text) { Write-Host ""; Write-Host "==> $Text" -ForegroundColor Cyan }
function Notice([string]$Text) { Write-Host "NOTICE: $Text" -ForegroundColor Yellow }
function Die([string]$Text) { Write-Host "ERROR: $Text" -ForegroundColor Red; exit 1 }

# Run a native command, capturing stdout and stderr as text; never throws.
function Invoke-Native([string]$Exe, [string[]]$Arguments) {
    $out = & $Exe @Arguments 2>&1 | ForEach-Object { "$_" }
    [pscustomobject]@{ Code = $LASTEXITCODE; Output = ($out -join "`n") }
}

# Print (dry run) or run a docker command with its output on the console; returns the exit code.
function Invoke-Docker([string[]]$Arguments) {
    if ($DryRun) {
        $shown = $Arguments | ForEach-Object { if ($_ -match '\s') { "'$_'" } else { $_ } }
        Write-Host ("+ docker " + ($shown -join " "))
        return 0
    }
    & docker @Arguments | Out-Host
    return $LASTEXITCODE
}

if ($Cpu -and $Gpu) { Die "-Cpu and -Gpu exclude each other" }
if ($Network -in @("default", "bridge")) { $Network = "" }
if ($Network -and $Network -ne "host") { Die "-Network: only 'host' is supported (got '$Network')" }
if ($WaitTimeout -lt 0) { Die "-WaitTimeout must be a number of seconds (got '$WaitTimeout')" }

# --- 1. Docker ------------------------------------------------------------------------
Step "Checking Docker"
if (-not (Get-Command docker -ErrorAction SilentlyContinue)) {
    if (-not $DryRun) {
        Die "Docker is not installed (no 'docker' command). Install Docker Desktop: https://docs.docker.com/desktop/setup/install/windows-install/"
    }
}
if (-not $DryRun) {
    $info = Invoke-Native "docker" @("info")
    if ($info.Code -ne 0) {
        Write-Host (($info.Output -split "`n" | Select-Object -Last 3) -join "`n")
        Die "Docker is installed but the engine does not answer. Start Docker Desktop and wait until it shows 'Engine running', then run this script again."
    }
    $version = (Invoke-Native "docker" @("version", "--format", "{{.Server.Version}}")).Output
    Say "Docker $version is running."
}
$CurlExe = $null
$curlCmd = Get-Command curl.exe -ErrorAction SilentlyContinue
if ($curlCmd) { $CurlExe = $curlCmd.Source }

# --- 2. Settings (.env) ---------------------------------------------------------------
if (-not $EnvFile) { $EnvFile = Join-Path $ScriptDir ".env" }
$EnvFile = [System.IO.Path]::GetFullPath($EnvFile)
$EnvDir = Split-Path -Parent $EnvFile
Step "Reading settings from $EnvFile"
if (-not (Test-Path -LiteralPath $EnvDir -PathType Container)) { Die "folder of $EnvFile does not exist" }
if (-not (Test-Path -LiteralPath $EnvFile -PathType Leaf)) {
    if (Test-Path -LiteralPath (Join-Path $EnvDir ".env.example")) {
        Copy-Item -LiteralPath (Join-Path $EnvDir ".env.example") -Destination $EnvFile
        Notice "created $EnvFile from .env.example; edit it to change settings (HUGGINGFACE_TOKEN, API_KEY, ...)"
    } elseif (Test-Path -LiteralPath (Join-Path $ScriptDir ".env.example")) {
        Copy-Item -LiteralPath (Join-Path $ScriptDir ".env.example") -Destination $EnvFile
        Notice "created $EnvFile from $ScriptDir\.env.example; edit it to change settings"
    } else {
        Notice "neither $EnvFile nor .env.example exists: using the defaults"
    }
}

# A .env is parsed, never run: KEY=VALUE lines, '#' comments, optional 'export ',
# optional single or double quotes around the value (as python-dotenv reads it).
$Settings = [ordered]@{}
if (Test-Path -LiteralPath $EnvFile -PathType Leaf) {
    $lineNo = 0
    foreach ($raw in [System.IO.File]::ReadAllLines($EnvFile)) {
        $lineNo++
        $line = $raw.Trim()
        if ($line -eq "" -or $line.StartsWith("#")) { continue }
        if ($line.StartsWith("export ")) { $line = $line.Substring(7) }
        $eq = $line.IndexOf("=")
        if ($eq -lt 0) { Notice "${EnvFile}:$lineNo ignored (no KEY=VALUE)"; continue }
        $key = $line.Substring(0, $eq).Trim()
        $value = $line.Substring($eq + 1).Trim()
        if ($key -notmatch '^[A-Za-z_][A-Za-z0-9_]*$') { Notice "${EnvFile}:$lineNo ignored (bad key '$key')"; continue }
        if ($value -match '^"(.*)"\s*(#.*)?$' -or $value -match "^'(.*)'\s*(#.*)?$") {
            $value = $Matches[1]
        } else {
            $value = ($value -replace '\s#.*$', '').Trim()
        }
        $Settings[$key] = $value
    }
}
function Get-Setting([string]$Key, [string]$Default = "") {
    if ($Settings.Contains($Key)) { return $Settings[$Key] } else { return $Default }
}

if ($Port -eq 0) {
    $portText = Get-Setting "PORT" "8000"
    if (-not $portText) { $portText = "8000" }
    if ($portText -notmatch '^\d+$') { Die "PORT must be a number from 1 to 65535 (got '$portText')" }
    $Port = [int]$portText
}
if ($Port -lt 1 -or $Port -gt 65535) { Die "PORT must be a number from 1 to 65535 (got '$Port')" }

# Absolute path of a setting that may be relative to the .env file's folder.
function Get-AbsPath([string]$Path) {
    if ($Path -eq "~") { $Path = $HOME }
    elseif ($Path.StartsWith("~/") -or $Path.StartsWith("~\")) { $Path = Join-Path $HOME $Path.Substring(2) }
    if (-not [System.IO.Path]::IsPathRooted($Path)) { $Path = Join-Path $EnvDir $Path }
    return [System.IO.Path]::GetFullPath($Path).TrimEnd('\', '/')
}

$HostModelDir = Get-Setting "HOST_MODEL_DIR" "./models"
if (-not $HostModelDir) { $HostModelDir = "./models" }
$HostModelDir = Get-AbsPath $HostModelDir

# MODEL_PATH as the container sees it: /models/... as is; a hub id as is (it is then
# cached in /models); a host path inside HOST_MODEL_DIR is translated to /models/...;
# anything else falls back to the image default (/models/HyperCLOVAX-SEED-Vision-Instruct-3B).
$ModelPathIn = ""
$modelPath = Get-Setting "MODEL_PATH"
if ($modelPath) {
    if ($modelPath -ceq "/models" -or $modelPath.StartsWith("/models/")) {
        $ModelPathIn = $modelPath
    } elseif ($modelPath -match '^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$' -and
              -not (Test-Path -LiteralPath (Join-Path $EnvDir $modelPath))) {
        $ModelPathIn = $modelPath
    } else {
        $hostModelPath = Get-AbsPath $modelPath
        if ($hostModelPath -ieq $HostModelDir) {
            $ModelPathIn = "/models"
        } elseif ($hostModelPath.StartsWith($HostModelDir + [System.IO.Path]::DirectorySeparatorChar,
                                            [System.StringComparison]::OrdinalIgnoreCase)) {
            $ModelPathIn = "/models/" + $hostModelPath.Substring($HostModelDir.Length + 1).Replace("\", "/")
        } else {
            Notice "MODEL_PATH=$modelPath is outside HOST_MODEL_DIR ($HostModelDir), which is the only host folder the container sees: using the image default $DefaultModelPath"
        }
    }
}
Say "Port: $Port (published on 127.0.0.1 only)"
Say "Model folder on this machine: $HostModelDir (mounted at /models)"
if ($ModelPathIn) { Say "MODEL_PATH in the container: $ModelPathIn" }
else { Say "MODEL_PATH in the container: $DefaultModelPath (default)" }

# --- 3. Model folder ------------------------------------------------------------------
if (-not $BuildOnly) {
    Step "Preparing the model folder"
    if (-not $DryRun -and -not (Test-Path -LiteralPath $HostModelDir -PathType Container)) {
        try {
            New-Item -ItemType Directory -Path $HostModelDir -Force -ErrorAction Stop | Out-Null
        } catch {
            Die "cannot create HOST_MODEL_DIR=${HostModelDir}: $($_.Exception.Message)"
        }
        Say "Created $HostModelDir"
    }
}

# --- 4. GPU -----------------------------------------------------------------------------
$UseGpu = $false
if (-not $BuildOnly) {
    Step "Looking for an NVIDIA GPU"
    $gpuList = ""
    if (Get-Command nvidia-smi -ErrorAction SilentlyContinue) {
        $smi = Invoke-Native "nvidia-smi" @("-L")
        if ($smi.Code -eq 0) { $gpuList = $smi.Output.Trim() }
    }
    if ($Cpu) {
        Notice "-Cpu given: running on the CPU."
    } elseif ($gpuList) {
        Say $gpuList
        $UseGpu = $true  # confirmed with a test container after the build
    } else {
        if ($Gpu) { Die "-Gpu given but no NVIDIA GPU was found (nvidia-smi -L)." }
        Notice "no NVIDIA GPU found (nvidia-smi -L): running on the CPU. This works but is slow (a few tokens per second)."
    }
}

# --- 5. Build -------------------------------------------------------------------------
$NetArgs = @()
if ($Network -eq "host") { $NetArgs = @("--network", "host") }
if (-not $NoBuild) {
    Step "Building image $Image (the first build downloads several GB)"
    $buildCmd = @("build") + $NetArgs + @("-t", $Image)
    if ($BaseImage) { $buildCmd += @("--build-arg", "BASE_IMAGE=$BaseImage") }
    foreach ($a in $BuildArg) { $buildCmd += @("--build-arg", $a) }
    $buildCmd += $ScriptDir
    $buildStarted = Get-Date
    if ((Invoke-Docker $buildCmd) -ne 0) { Die "docker build failed (see above)" }
    if (-not $DryRun) { Say ("Built $Image in {0:N0}s." -f ((Get-Date) - $buildStarted).TotalSeconds) }
} elseif (-not $DryRun) {
    if ((Invoke-Native "docker" @("image", "inspect", $Image)).Code -ne 0) {
        Die "-NoBuild given but image $Image does not exist"
    }
}
if ($BuildOnly) {
    Say "-BuildOnly given: not starting a container."
    exit 0
}

if ($UseGpu) {
    $probe = @("run", "--rm", "--network", "none", "--gpus", "all", $Image, "true")
    if ($DryRun) {
        Invoke-Docker $probe | Out-Null
    } else {
        $gpuTest = Invoke-Native "docker" $probe
        if ($gpuTest.Code -ne 0) {
            Write-Host (($gpuTest.Output -split "`n" | Select-Object -Last 2) -join "`n")
            if ($Gpu) { Die "-Gpu given but Docker cannot use the GPU: update the NVIDIA driver and Docker Desktop (WSL 2 backend)." }
            Notice "an NVIDIA GPU is present but Docker cannot use it (update the NVIDIA driver and Docker Desktop, WSL 2 backend): running on the CPU."
            $UseGpu = $false
        } else {
            Say "Docker can use the GPU (--gpus all)."
        }
    }
}

# --- 6. Run ---------------------------------------------------------------------------
Step "Starting container $Name"
if (-not $DryRun -and (Invoke-Native "docker" @("container", "inspect", $Name)).Code -eq 0) {
    Say "Removing the old container $Name"
    Invoke-Native "docker" @("rm", "-f", $Name) | Out-Null
}

# The container's settings: the .env without the keys set below, in a private temp file
# (docker's --env-file takes values verbatim, so the parsed values are written back).
$envLines = New-Object System.Collections.Generic.List[string]
foreach ($key in $Settings.Keys) {
    if ($key -in @("HOST", "PORT", "HOST_MODEL_DIR", "MODEL_PATH")) { continue }
    $value = $Settings[$key]
    if ($key -eq "DEVICE" -and -not $UseGpu -and $value -like "cuda*") {
        Notice "DEVICE=$value but no GPU is used: DEVICE=cpu in the container"
        $value = "cpu"
    }
    $envLines.Add("$key=$value")
}
$EnvTmp = [System.IO.Path]::GetTempFileName()
# UTF-8 without a BOM: docker would read a BOM as part of the first key.
[System.IO.File]::WriteAllLines($EnvTmp, [string[]]$envLines, (New-Object System.Text.UTF8Encoding($false)))

$runCmd = @("run", "-d", "--name", $Name, "--restart", "unless-stopped")
if ($Network -eq "host") {
    # Host networking: -p would be ignored, so the server binds the loopback port itself.
    $runCmd += @("--network", "host", "-e", "HOST=127.0.0.1", "-e", "PORT=$Port")
} else {
    $runCmd += @("-p", "127.0.0.1:${Port}:$ContainerPort", "-e", "HOST=0.0.0.0", "-e", "PORT=$ContainerPort")
}
if ($UseGpu) { $runCmd += @("--gpus", "all") }
$runCmd += @("-v", "${HostModelDir}:/models", "--env-file", $EnvTmp, "-e", "HOST_MODEL_DIR=/models")
if ($ModelPathIn) { $runCmd += @("-e", "MODEL_PATH=$ModelPathIn") }
$runCmd += $Image
try {
    if ($DryRun) {
        Invoke-Docker $runCmd | Out-Null
        # The env file's lines, secrets masked.
        foreach ($l in $envLines) {
            Write-Host ("  env-file: " + ($l -replace '^([A-Za-z0-9_]*(TOKEN|KEY|SECRET|PASSWORD)[A-Za-z0-9_]*=).+', '$1***'))
        }
        Say "(dry run: nothing was started)"
    } else {
        $started = Invoke-Native "docker" $runCmd
    }
} finally {
    Remove-Item -LiteralPath $EnvTmp -Force -ErrorAction SilentlyContinue
}
if ($DryRun) { exit 0 }
if ($started.Code -ne 0) { Write-Host $started.Output; Die "docker run failed (see above)" }
$containerId = ($started.Output.Trim() -split "`n")[-1].Trim()
if ($containerId.Length -gt 12) { $containerId = $containerId.Substring(0, 12) }
$mode = if ($UseGpu) { "GPU" } else { "CPU" }
Say "Started $containerId on $mode."

# --- 7. Wait for /health ----------------------------------------------------------------
$BaseUrl = "http://localhost:$Port"
function Get-Url([string]$Url) {
    if ($CurlExe) { return (Invoke-Native $CurlExe @("-s", "-m", "5", $Url)).Output }
    try {
        return (Invoke-WebRequest -Uri $Url -UseBasicParsing -TimeoutSec 5).Content
    } catch {
        if ($_.ErrorDetails -and $_.ErrorDetails.Message) { return $_.ErrorDetails.Message }
        return ""
    }
}
function Get-FolderSize([string]$Path) {
    $sum = (Get-ChildItem -LiteralPath $Path -Recurse -File -Force -ErrorAction SilentlyContinue |
            Measure-Object -Property Length -Sum).Sum
    if (-not $sum) { return "0" }
    if ($sum -ge 1073741824) { return "{0:N1}G" -f ($sum / 1073741824) }
    return "{0:N0}M" -f ($sum / 1048576)
}

if ($WaitTimeout -ne 0) {
    Step "Waiting for $BaseUrl/health (up to ${WaitTimeout}s; the first run downloads the model)"
    $waitStarted = Get-Date
    $lastLine = -1
    while ($true) {
        $elapsed = [int]((Get-Date) - $waitStarted).TotalSeconds
        $state = (Invoke-Native "docker" @("inspect", "-f", "{{.State.Status}} {{.RestartCount}}", $Name)).Output.Trim()
        if ($state -ne "running 0") {
            Write-Host ""
            Invoke-Native "docker" @("logs", "--tail", "40", $Name) | ForEach-Object { Write-Host $_.Output }
            Die "the container stopped ($state) before it was ready; its last log lines are above."
        }
        $body = Get-Url "$BaseUrl/health"
        $health = $null
        if ($body) { try { $health = $body | ConvertFrom-Json } catch { $health = $null } }
        $status = if ($health -and $health.status) { [string]$health.status } else { "" }
        if ($status -eq "ok") {
            Write-Host ""
            Say "Ready after ${elapsed}s."
            break
        }
        if ($status -eq "error") {
            Write-Host ""
            Invoke-Native "docker" @("logs", "--tail", "40", $Name) | ForEach-Object { Write-Host $_.Output }
            Die "the model failed to load: $($health.error). Fix the setting, then run this script again."
        }
        if ($elapsed -ge $WaitTimeout) {
            Write-Host ""
            Invoke-Native "docker" @("logs", "--tail", "20", $Name) | ForEach-Object { Write-Host $_.Output }
            $last = if ($body) { $body } else { "no answer" }
            Die "not ready after ${WaitTimeout}s (last /health: $last). It keeps running: follow it with 'docker logs -f $Name'."
        }
        $shownStatus = if ($status) { $status } else { "starting" }
        $msg = "  $shownStatus... ${elapsed}s, model folder $(Get-FolderSize $HostModelDir)"
        if ([Environment]::UserInteractive -and -not [Console]::IsOutputRedirected) {
            Write-Host -NoNewline ("`r" + $msg.PadRight(70))
        } elseif ([int][Math]::Floor($elapsed / 15) -ne $lastLine) {
            $lastLine = [int][Math]::Floor($elapsed / 15)
            Say $msg
        }
        Start-Sleep -Seconds 2
    }
}

# --- 8. Done ----------------------------------------------------------------------------
Step "hcx-server is running (container $Name, image $Image, $mode)"
Say "  Health:      $BaseUrl/health"
Say "  REST (seed): POST $BaseUrl/tool/generate_hyperclovax_vision   {`"prompt`": `"...`", `"image_base64`": `"...`"}"
Say "  MCP:         $BaseUrl/mcp"
Say "  OpenAI API:  $BaseUrl/v1   (POST /v1/chat/completions, GET /v1/models)"
Say ""
Say "Caret MCP config (paste into Caret's MCP settings):"
Say ('{"mcpServers":{"hyperclovax":{"type":"streamableHttp","url":"' + $BaseUrl + '/mcp","timeout":300}}}')
Say ""
Say "Logs: docker logs -f $Name    Stop: docker stop $Name    Remove: docker rm -f $Name"
if (Get-Setting "API_KEY") {
    Notice "API_KEY is set: clients must send it (Authorization: Bearer <API_KEY>)."
}
