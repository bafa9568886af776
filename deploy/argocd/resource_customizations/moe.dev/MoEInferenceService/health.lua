-- Argo CD health check for moe.dev/MoEInferenceService.
--
-- It reads only the status contract every moe.dev kind follows, so the same
-- script serves every kind (it is MoETrainingJob's, verbatim): copy this folder under the
-- kind's name and add its testdata. The contract (docs/operations.md):
--   status.observedGeneration  the generation the status was computed from;
--   conditions Ready, Reconciling, Stalled (kstatus) and Suspended.
-- It uses only the base and table libraries: Argo CD opens no others for
-- checks configured in argocd-cm.
-- Verdicts: not yet observed or out of date -> Progressing; Stalled -> Degraded;
-- Suspended -> Suspended; Ready -> Healthy; otherwise Progressing.
local hs = {}

local function condition(type)
  if obj.status ~= nil and obj.status.conditions ~= nil then
    for _, c in ipairs(obj.status.conditions) do
      if c.type == type then
        return c
      end
    end
  end
  return nil
end

local function verdict(status, type, default)
  hs.status = status
  local c = condition(type)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    hs.message = c.message
  else
    hs.message = default
  end
  return hs
end

local function is_true(type)
  local c = condition(type)
  return c ~= nil and c.status == "True"
end

if obj.status == nil or obj.status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe the resource"
  return hs
end
if obj.metadata.generation ~= nil and obj.status.observedGeneration ~= obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(obj.metadata.generation) ..
    " (status is of generation " .. tostring(obj.status.observedGeneration) .. ")"
  return hs
end
if is_true("Stalled") then
  return verdict("Degraded", "Stalled", "Stalled")
end
if is_true("Suspended") then
  return verdict("Suspended", "Suspended", "Suspended")
end
if is_true("Ready") then
  return verdict("Healthy", "Ready", "Ready")
end
if is_true("Reconciling") then
  return verdict("Progressing", "Reconciling", "Reconciling")
end
return verdict("Progressing", "Ready", "Waiting for the Ready condition")
