-- Argo CD health of a ModelCache (modelcache.dev/v1alpha1), from the status
-- the controller writes. Register it under
-- resource.customizations.health.modelcache.dev_ModelCache (see README).
-- Lua 5.1 as Argo CD runs it (gopher-lua): no goto, no integer division.
local hs = {}

local function condition(status, type_)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

local status = obj.status
if status == nil or status.conditions == nil or #status.conditions == 0 then
  hs.status = "Progressing"
  hs.message = "Waiting for the controller to report status"
  return hs
end

local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the controller to observe generation " .. tostring(generation)
  return hs
end

local valid = condition(status, "SpecValid")
if valid ~= nil and valid.status == "False" then
  hs.status = "Degraded"
  hs.message = valid.message or valid.reason or "the spec is invalid"
  return hs
end

local ready = condition(status, "Ready")
if ready == nil or ready.status == "Unknown" then
  hs.status = "Progressing"
  hs.message = (ready and ready.message) or "Waiting for Redis"
  return hs
end
if ready.status == "False" then
  -- A Redis that has never answered is still being provisioned; one that
  -- answered before and does not now is a failure.
  if ready.reason == "RedisUnavailable" and (status.redis == nil or status.redis.endpoint == nil) then
    hs.status = "Progressing"
    hs.message = "Provisioning Redis: " .. (ready.message or "")
    return hs
  end
  hs.status = "Degraded"
  hs.message = ready.message or ready.reason or "Redis is not ready"
  return hs
end

-- Ready. A rollout in progress: the active version's pods are not all ready
-- yet (their init containers fetch the weights, their sidecars warm the
-- prefix cache), or a retired version's keys are being swept.
if status.versions ~= nil then
  for _, v in ipairs(status.versions) do
    -- readyPods is reported only where the ModelCache names its workload.
    if v.version == status.activeVersion and v.phase == "Live" and v.readyPods ~= nil then
      local pods = v.pods or 0
      local ready = v.readyPods
      if pods == 0 or ready < pods then
        hs.status = "Progressing"
        hs.message = "Version " .. v.version .. ": " .. tostring(ready) .. " of " .. tostring(pods) ..
          " pods ready (fetching weights or warming the prefix cache)"
        return hs
      end
    end
  end
  for _, v in ipairs(status.versions) do
    if v.phase == "Sweeping" then
      hs.status = "Progressing"
      hs.message = "Sweeping the keys of retired version " .. v.version
      return hs
    end
  end
end

-- Prefetch on rollout (spec.prefetch): the selected nodes do not all hold
-- the version yet. A selector no node matches will never be met.
local prefetched = condition(status, "Prefetched")
if prefetched ~= nil and prefetched.status == "False" then
  if prefetched.reason == "NoNodes" then
    hs.status = "Degraded"
  else
    hs.status = "Progressing"
  end
  hs.message = "Prefetch: " .. (prefetched.message or prefetched.reason or "")
  return hs
end

hs.status = "Healthy"
hs.message = ready.message or "Ready"
return hs
